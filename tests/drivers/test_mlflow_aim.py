"""What a run leaves in MLflow (a local store, no server) and Aim (a local repository), read back through each
tool's own client: bnguard's statistics, pictures and recalibration records in the run the accelerator
opened, and a resumed run continuing it."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import aim
import mlflow
import pytest
import torch
import torch.nn.functional as F
from aim.storage.context import Context
from torch.utils.data import DataLoader

import bnguard
from bnguard.drivers.tracker_setup import RUN_ID_FILES
from bnguard.hooks import bn_stats
from helpers import tiny_resnet, toy_data, toy_loop


@pytest.fixture(params=["sqlite", "file"])
def mlflow_store(request, tmp_path, monkeypatch):
    """MLflow's default local store (SQLite) and its file store (a ``file:`` URI), in a folder of the test's
    (which is also the working folder: MLflow puts a SQLite store's artifacts in ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    if request.param == "file":  # kept by MLflow 3 for those who opt in
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri("")


class RunIds(bnguard.Hook):
    """Which runs the hooks saw their trackers log to."""

    def __init__(self):
        self.mlflow, self.aim = [], []

    def on_fit_start(self, state):
        self.mlflow.append(state.trackers.mlflow_run_id())
        run = state.trackers.aim_run()
        self.aim.append(run.hash if run is not None else None)


def hooks_and_ids():
    ids = RunIds()
    hooks = [bnguard.BNStatsLogger(every_n_steps=3), bnguard.PreciseBN(monitor=None),
             bnguard.AutoRecalibrate(gap_threshold=-1.0), ids]
    return hooks, ids


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: (m.step, m.timestamp))]


def layer_table(client, run_id, folder):
    """The rows of the run's at-a-glance layer table, as MLflow keeps it."""
    path = client.download_artifacts(run_id, "at-a-glance/layers.csv", str(folder))
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def batchnorm(model):
    return {name: layer for name, layer in model.named_modules() if isinstance(layer, torch.nn.BatchNorm2d)}


def test_mlflow_holds_the_statistics_pictures_and_records_in_the_accelerators_run(tmp_path, mlflow_store):
    hooks, ids = hooks_and_ids()
    loop = toy_loop(tmp_path / "run", hooks=hooks, epochs=2, tracker="mlflow", project="toys")
    loop.fit()
    client = mlflow_store
    (experiment,) = [e for e in client.search_experiments() if e.name == "toys"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert ids.mlflow == [run.info.run_id] == [(tmp_path / "run" / RUN_ID_FILES["mlflow"]).read_text()]
    run_id, layers = run.info.run_id, batchnorm(loop.accelerator.unwrap_model(loop.model))
    rows = records(tmp_path / "run")
    # at a step where AutoRecalibrate recalibrated, the value after it follows the one before
    assert dict(history(client, run_id, "eval_acc")) == {r["step"]: r["eval_acc"] for r in rows}
    assert run.data.params["epochs"] == "2"

    for name, layer in layers.items():  # the last summaries are the statistics training ended with
        var, mean = layer.running_var.double(), layer.running_mean.double()
        assert history(client, run_id, f"bn/{name}/running_var/max")[-1] == (12, var.max().item())
        assert history(client, run_id, f"bn/{name}/running_var/min")[-1] == (12, var.min().item())
        assert history(client, run_id, f"bn/{name}/running_mean/mean")[-1][1] == pytest.approx(mean.mean().item(),
                                                                                                rel=1e-12, abs=1e-15)
        assert history(client, run_id, f"bn/{name}/running_mean/std")[-1][1] == pytest.approx(
            mean.std(unbiased=False).item(), rel=1e-9, abs=1e-12)
    steps = [step for step, _ in history(client, run_id, f"bn/{next(iter(layers))}/running_var/max")]
    assert steps == [3, 6, 6, 6, 9, 12, 12]  # every 3 steps, and again after each recalibration (2 at step 6)

    assert history(client, run_id, "bnguard/PreciseBN/recalibrated") == [(6, 1.0), (12, 1.0)]
    assert [v for _, v in history(client, run_id, "bnguard/PreciseBN/recal_samples")] == [
        r["PreciseBN/recal_samples"] for r in rows]
    bounds = history(client, run_id, "bnguard/PreciseBN/recal_error_bound")
    assert [s for s, _ in bounds] == [6, 12] and all(0 < bound < 1 for _, bound in bounds)
    auto = [v for _, v in history(client, run_id, "bnguard/AutoRecalibrate/recalibrated")]
    assert auto == [float(r["AutoRecalibrate/recalibrated"]) for r in rows]
    tags = client.get_run(run_id).data.tags
    assert tags["bnguard/PreciseBN/reason"] == rows[-1]["PreciseBN/reason"]
    assert tags["bnguard/AutoRecalibrate/reason"] == rows[-1]["AutoRecalibrate/reason"]
    if rows[-1]["AutoRecalibrate/diagnosis"] is not None:
        assert tags["bnguard/AutoRecalibrate/diagnosis"] == rows[-1]["AutoRecalibrate/diagnosis"]

    table = layer_table(client, run_id, tmp_path)
    assert [row["layer"] for row in table] == list(layers)
    for row, layer in zip(table, layers.values()):
        assert float(row["running_var_max"]) == layer.running_var.double().max().item()
        assert int(row["last_recalibration_step"]) == 12 and float(row["last_shift"]) >= 0
    assert Path(client.download_artifacts(run_id, "at-a-glance/staleness.png", str(tmp_path))).read_bytes()[:4] == \
        b"\x89PNG"
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    assert any("at-a-glance~staleness+step+6" in path for path in images)  # the heatmap by step as well


def test_an_evaluation_computes_the_statistics_once_for_the_histograms_and_mlflows_layer_table(
        tmp_path, mlflow_store, monkeypatch):
    computed = []
    real = bn_stats.bn_statistics
    monkeypatch.setattr(bn_stats, "bn_statistics", lambda *args, **kwargs: computed.append(1) or real(*args, **kwargs))
    loop = toy_loop(tmp_path / "run", hooks=[bnguard.BNStatsLogger(every_n_steps=1000)], epochs=2, tracker="mlflow",
                    project="toys")
    loop.fit()
    assert len(computed) == 2  # one per evaluation: the layer table takes the histograms' (it made its own)
    (experiment,) = [e for e in mlflow_store.search_experiments() if e.name == "toys"]
    (run,) = mlflow_store.search_runs([experiment.experiment_id])
    table = layer_table(mlflow_store, run.info.run_id, tmp_path)
    layers = batchnorm(loop.accelerator.unwrap_model(loop.model))
    assert [row["layer"] for row in table] == list(layers)
    for row, layer in zip(table, layers.values()):
        assert float(row["running_var_max"]) == layer.running_var.double().max().item()
        assert float(row["running_mean_min"]) == layer.running_mean.double().min().item()


def test_a_resumed_run_continues_the_mlflow_run_it_started(tmp_path, mlflow_store):
    first, first_ids = hooks_and_ids()
    toy_loop(tmp_path, hooks=first, epochs=1, tracker="mlflow", project="toys", checkpoint_every_epochs=1).fit()
    second, second_ids = hooks_and_ids()
    toy_loop(tmp_path, hooks=second, epochs=2, tracker="mlflow", project="toys",
             checkpoint_every_epochs=1).fit(resume_from="latest")
    assert second_ids.mlflow == first_ids.mlflow
    (experiment,) = [e for e in mlflow_store.search_experiments() if e.name == "toys"]
    (run,) = mlflow_store.search_runs([experiment.experiment_id])
    assert sorted(dict(history(mlflow_store, run.info.run_id, "eval_acc"))) == [6, 12]
    assert run.info.status == "FINISHED"


def aim_run(folder, run_hash):
    """The run as Aim's own SDK reads it, once Aim's index holds it (the Aim UI indexes in the background)."""
    aim_cli = Path(sys.executable).with_name("aim")
    subprocess.run([str(aim_cli), "storage", "--repo", str(folder), "reindex", "-y"], check=True,
                   capture_output=True, timeout=120)
    return aim.Repo.from_path(str(folder)).get_run(run_hash)


def test_aim_holds_distributions_and_records_and_a_resumed_run_continues_it(tmp_path):
    first, first_ids = hooks_and_ids()
    toy_loop(tmp_path, hooks=first, epochs=1, tracker="aim", project="toys", checkpoint_every_epochs=1).fit()
    hooks, ids = hooks_and_ids()
    loop = toy_loop(tmp_path, hooks=hooks, epochs=2, tracker="aim", project="toys", checkpoint_every_epochs=1)
    loop.fit(resume_from="latest")
    assert ids.aim == first_ids.aim == [(tmp_path / RUN_ID_FILES["aim"]).read_text()]
    run = aim_run(tmp_path, ids.aim[0])
    assert run.experiment == "toys"
    layers = batchnorm(loop.accelerator.unwrap_model(loop.model))
    name, layer = next(iter(layers.items()))
    sequence = run.get_distribution_sequence(f"bn/{name}/running_var", Context({}))
    steps, (distributions, *_) = sequence.data.items_list()
    assert steps == [3, 6, 9, 12]  # both parts of the run, in one; a later value at a step replaces the earlier
    final = bnguard.bn_statistics(loop.model, bins=64)[f"bn/{name}/running_var"]
    counts, edges = distributions[-1].to_np_histogram()
    assert counts.tolist() == final.counts.tolist() and (edges[0], edges[-1]) == (final.edges[0], final.edges[-1])

    metrics = {(m.name, m.context.to_dict().get("subset")): m for m in run.metrics()}
    rows = records(tmp_path)
    steps, (samples, *_) = metrics[("bnguard/PreciseBN/recal_samples", None)].data.items_list()
    assert (steps, samples) == ([6, 12], [r["PreciseBN/recal_samples"] for r in rows])
    steps, (accuracies, *_) = metrics[("eval_acc", None)].data.items_list()
    assert (steps, accuracies) == ([6, 12], [r["eval_acc"] for r in rows])
    assert run["bnguard/PreciseBN/reason"] == rows[-1]["PreciseBN/reason"]
    assert [row["layer"] for row in run["bn/layers"]] == list(layers)


def test_a_guard_logs_into_the_users_own_mlflow_run_beside_their_metrics(tmp_path, mlflow_store):
    from accelerate import Accelerator

    accelerator = Accelerator(log_with="mlflow", project_dir=str(tmp_path))
    accelerator.init_trackers("mine")
    users_run = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    torch.manual_seed(0)
    model = tiny_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train = DataLoader(toy_data(16), batch_size=4, shuffle=True)
    model, optimizer, train = accelerator.prepare(model, optimizer, train)
    guard = bnguard.Guard(model, [bnguard.BNStatsLogger(every_n_steps=2), bnguard.PreciseBN(monitor=None)],
                          evaluate=lambda: {"acc": 0.5}, train_loader=train, accelerator=accelerator)
    step = 0
    for _ in range(2):
        for images, labels in train:
            outputs = model(images)
            loss = F.cross_entropy(outputs, labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            accelerator.log({"train_loss": loss.item()}, step=step)  # the user's own name
            guard.step(outputs, labels, loss=loss)
        guard.evaluated({"acc": 0.5})
    guard.end()
    accelerator.end_training()
    (experiment,) = [e for e in mlflow_store.search_experiments() if e.name == "mine"]
    (run,) = mlflow_store.search_runs([experiment.experiment_id])
    assert run.info.run_id == users_run
    assert [s for s, _ in history(mlflow_store, users_run, "train_loss")] == list(range(1, 9))
    assert [s for s, _ in history(mlflow_store, users_run, "bnguard/train_loss")] == [4, 8]
    assert history(mlflow_store, users_run, "bnguard/recalibrated") == [(4, 1.0), (8, 1.0)]
    bn = next(iter(batchnorm(accelerator.unwrap_model(model))))
    steps = [s for s, _ in history(mlflow_store, users_run, f"bn/{bn}/running_var/max")]
    assert steps == [2, 4, 4, 6, 8, 8]  # every 2 steps, and again after each recalibration


@pytest.mark.parametrize("tracker", ["mlflow", "aim"])
def test_a_tracker_whose_package_is_missing_names_the_extra(tracker, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # any import of it now fails
    with pytest.raises(ImportError, match=rf"tracker '{tracker}' needs the {tracker} package.*"
                                          rf"pip install 'bnguard\[{tracker}\]'"):
        toy_loop(tmp_path, tracker=tracker)
    assert not (tmp_path / "metrics.jsonl").exists()
