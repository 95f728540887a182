"""What a run leaves in real trackers: an offline W&B run read back from its .wandb file, TensorBoard events."""

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bnguard
from helpers import toy_loop
from wandb_log import config, history, offline_run_dir


@pytest.fixture
def no_wandb_settings(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings of the machine's user


def test_wandb_runs_offline_without_a_key_and_holds_every_metric(tmp_path, no_wandb_settings, capsys):
    loop = toy_loop(tmp_path, epochs=2, tracker="wandb", log_every_steps=2, config={"note": "toy"})
    loop.fit()
    run_dir = offline_run_dir(tmp_path)
    assert f"wandb sync {run_dir}" in capsys.readouterr().out
    rows = history(run_dir)
    train_steps = [r["_step"] for r in rows if "train_loss" in r]
    eval_steps = [r["_step"] for r in rows if "eval_acc" in r]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    assert eval_steps == [6, 12]
    assert all({"train_acc", "lr", "epoch"} <= r.keys() for r in rows if "train_loss" in r)
    assert all(0 <= r["eval_acc"] <= 1 and "eval_loss" in r for r in rows if "eval_acc" in r)
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps)
    settings = config(run_dir)
    assert settings["note"] == "toy" and settings["epochs"] == 2 and settings["optimizer"] == "SGD"


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    toy_loop(tmp_path, epochs=2, tracker="tensorboard", log_every_steps=3).fit()
    (event_file,) = (tmp_path / "tensorboard").glob("*/events.out.tfevents.*")  # hparams add a subfolder
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [3, 6, 9, 12]
    assert [e.step for e in events.Scalars("eval_acc")] == [6, 12]
    assert all(0 <= e.value <= 1 for e in events.Scalars("eval_acc"))


def test_two_deciding_hooks_keep_their_own_record_fields_and_tracker_keys(tmp_path, no_wandb_settings):
    hooks = [bnguard.PreciseBN(every_n_evals=2), bnguard.AutoRecalibrate()]
    loop = toy_loop(tmp_path, hooks=hooks, epochs=2, tracker="wandb")
    loop.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["PreciseBN/recalibrated"] for r in rows] == [False, True]
    assert [r["PreciseBN/recal_samples"] for r in rows] == [0, 24]
    assert [r["AutoRecalibrate/recalibrated"] for r in rows] == [d["recalibrated"] for d in hooks[1].history]
    assert all("AutoRecalibrate/diagnosis" in r and "recalibrated" not in r for r in rows)
    logged = history(offline_run_dir(tmp_path))
    assert [r["bnguard/PreciseBN/recalibrated"] for r in logged if "bnguard/PreciseBN/recalibrated" in r] == [0, 1]
    assert len([r for r in logged if "bnguard/AutoRecalibrate/recalibrated" in r]) == 2
    assert not [r for r in logged if "bnguard/recalibrated" in r]


def test_a_resumed_run_continues_its_wandb_run(tmp_path, no_wandb_settings):
    class Interrupt(bnguard.Hook):
        def on_epoch_start(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        toy_loop(tmp_path, hooks=[Interrupt()], epochs=2, tracker="wandb", checkpoint_every_epochs=1).fit()
    first_id = (tmp_path / "wandb-run-id").read_text()
    toy_loop(tmp_path, epochs=2, tracker="wandb", checkpoint_every_epochs=1).fit(resume_from="latest")
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    # offline-run-<date>_<time>-<id>, with -1 after a second folder of the same second
    assert len(runs) == 2 and [run.name.split("-")[3] for run in runs] == [first_id, first_id]
    assert (tmp_path / "wandb-run-id").read_text() == first_id
    fresh = tmp_path / "fresh"
    toy_loop(fresh, epochs=1, tracker="wandb").fit()
    assert (fresh / "wandb-run-id").read_text() != first_id


def test_tensorboard_missing_names_the_package_to_install(tmp_path, monkeypatch):
    for package in ("tensorboard", "tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.warns(UserWarning, match="the tensorboard package is not installed; pip install tensorboard"):
        toy_loop(tmp_path, epochs=1, tracker="tensorboard").fit()
    assert not (tmp_path / "tensorboard").exists()


def test_a_tracker_that_fails_to_start_warns_once_and_training_goes_on(tmp_path, no_wandb_settings, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # no key, not interactive: wandb.init refuses at once
    loop = toy_loop(tmp_path, epochs=1, tracker="all")
    with pytest.warns(UserWarning, match="tracker 'wandb' could not start") as caught:
        final = loop.fit()
    assert len([w for w in caught if "could not start" in str(w.message)]) == 1
    assert final["epoch"] == 1
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
