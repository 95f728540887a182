"""The Hugging Face adapter in real Trainers on CPU: reporting integrations read back, best-model selection,
checkpoints and resume, torchrun on 2 processes."""

import subprocess
import sys

import pytest
import torch
import transformers
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers.modelcard import TrainingSummary

from bnguard import AutoRecalibrate, BNStatsLogger, Hook, PreciseBN, TrainingBatches, Verdict, recalibrate
from bnguard.integrations.transformers import STATE_FILE, BNGuardCallback
from helpers import (
    SUPPORT,
    assert_same_tensors,
    assert_two_ranks_agree,
    buffers_of,
    parameters_of,
    reevaluating_hook,
    support_env,
    without_timings,
)
from hf_setup import ImageDicts, tiny_resnet, trainer
from wandb_log import history, offline_run_dir

LOSS = dict(monitor="loss", higher_is_better=False)


def bn_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_histograms_of_every_batchnorm_layer_reach_wandb_and_tensorboard(tmp_path, wandb_dir):
    model = tiny_resnet()
    hooks = [BNStatsLogger(every_n_steps=2, on_eval=False, overview_metric="accuracy")]
    trainer(tmp_path, [BNGuardCallback(hooks)], model=model, epochs=2, report_to=["wandb", "tensorboard"]).train()
    wandb.finish()  # the Trainer leaves its run open
    rows = history(offline_run_dir(wandb_dir))
    names = bn_names(model)
    assert len(names) == 8
    for name in names:
        for tensor in ("running_mean", "running_var"):
            logged = [r for r in rows if f"bn/{name}/{tensor}/_type" in r]
            assert [r["train/global_step"] for r in logged] == [2, 4, 6, 8]
            assert sum(logged[-1][f"bn/{name}/{tensor}/values"]) == model.get_submodule(name).num_features
    assert any("bn/layers/_type" in r for r in rows)
    (events_file,) = tmp_path.glob("runs/*/events.out.tfevents.*")
    events = EventAccumulator(str(events_file.parent), size_guidance={"histograms": 0})
    events.Reload()
    for name in names:
        assert [e.step for e in events.Histograms(f"bn/{name}/running_mean")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8]  # the Trainer's own, unchanged


def test_stale_statistics_are_recalibrated_and_the_best_model_is_chosen_by_the_new_metrics(tmp_path, wandb_dir,
                                                                                            capsys):
    callback = BNGuardCallback([AutoRecalibrate(**LOSS)])
    fit = trainer(tmp_path, [callback], model=tiny_resnet(bn_momentum=0.0), epochs=1, report_to="wandb",
                  metric_for_best_model="loss", greater_is_better=False)
    fit.train()
    wandb.finish()
    (record,) = callback.records
    assert record["recalibrated"] and record["diagnosis"] == Verdict.STALE
    assert record["eval_loss"] < record["eval_loss_before_recal"]
    assert fit.state.best_metric == record["eval_loss"]  # the Trainer picked by the recalibrated loss
    assert (f"bnguard: after recalibration eval_loss {record['eval_loss']:.4f}, eval_accuracy "
            f"{record['eval_accuracy']:.4f}") in capsys.readouterr().out
    stale, corrected = [h for h in fit.state.log_history if "eval_loss" in h]
    assert stale["eval_loss"] == record["eval_loss_before_recal"]  # what the Trainer measured and logged
    assert corrected.keys() == stale.keys() and (corrected["step"], corrected["epoch"]) == (stale["step"], 1.0)
    assert corrected["eval_loss"] == record["eval_loss"]
    assert corrected["eval_accuracy"] == record["eval_accuracy"] != stale["eval_accuracy"]  # re-evaluated too
    (decision,) = [h for h in fit.state.log_history if any(key.startswith("bnguard/") for key in h)]
    assert decision == {**{f"bnguard/{key}": value for key, value in record.items()
                           if key in callback.runner.state.record}, "step": 4}
    logged = [(r["eval/loss"], r["train/global_step"]) for r in history(offline_run_dir(wandb_dir)) if "eval/loss" in r]
    assert logged == [(stale["eval_loss"], 4), (record["eval_loss"], 4)]  # the new value at the same step
    assert any(r.get("bnguard/eval_loss_before_recal") == stale["eval_loss"]
               for r in history(offline_run_dir(wandb_dir)))


def test_the_model_card_reads_the_log_history_and_gives_the_recalibrated_results(tmp_path):
    callback = BNGuardCallback([AutoRecalibrate(**LOSS)])
    fit = trainer(tmp_path, [callback], model=tiny_resnet(bn_momentum=0.0), epochs=2)
    fit.train()
    assert callback.records[0]["recalibrated"]
    fit.create_model_card(model_name="tiny")  # what push_to_hub writes, here without the upload
    card = (tmp_path / "README.md").read_text()
    evaluations = [h for h in fit.state.log_history if "eval_loss" in h]
    final = evaluations[-1]
    summary = TrainingSummary.from_trainer(fit)
    assert summary.eval_results == {"Loss": final["eval_loss"], "Accuracy": final["eval_accuracy"]}
    rows = [line for line in card.splitlines() if line.startswith("| ") and "Validation Loss" not in line]
    assert len(rows) == len(evaluations) > 2  # the Trainer's evaluations and the recalibrated copies


def test_the_re_evaluation_measures_what_the_trainer_measured(tmp_path):
    class Remeasure(Hook):
        pairs = []

        def on_eval_end(self, state):
            self.pairs.append((dict(state.eval_metrics), state.evaluate()))

    hook = Remeasure()
    trainer(tmp_path, [BNGuardCallback([hook])], evaluation=ImageDicts(13, seed=1), epochs=2).train()
    assert len(hook.pairs) == 2
    for measured, again in hook.pairs:  # the Trainer's own loop and compute_metrics: equal to the last bit
        assert again["eval_loss"] == measured["eval_loss"] and again["eval_accuracy"] == measured["eval_accuracy"]


def test_precise_bn_recalibrates_before_each_evaluation_exactly(tmp_path):
    class Snapshot(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            self.buffers = buffers_of(model)

    snapshot, model, train = Snapshot(), tiny_resnet(), ImageDicts(32)
    trainer(tmp_path, [BNGuardCallback([PreciseBN(num_samples=32)]), snapshot], model=model, train=train,
            epochs=1).train()
    reference = tiny_resnet()
    reference.load_state_dict(model.state_dict())
    batches = TrainingBatches(torch.utils.data.DataLoader(train, batch_size=8))()  # the batches it draws
    recalibrate(reference, batches, num_samples=32, progress=False)
    assert_same_tensors(snapshot.buffers, buffers_of(reference))


def test_genuine_overfitting_is_not_recalibrated_at_every_evaluation(tmp_path):
    # Only the head learns, from fixed features whose statistics are exact after one full batch (cumulative
    # average): the head memorizes random labels, and recalibrating can explain none of the gap.
    model = tiny_resnet(bn_momentum=None)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("classifier")
    callback = BNGuardCallback([AutoRecalibrate(**LOSS)])
    trainer(tmp_path, [callback], model=model, train=ImageDicts(16, random_labels=True),
            evaluation=ImageDicts(64, seed=3, random_labels=True), epochs=10, per_device_train_batch_size=16,
            lr_scheduler_type="constant").train()
    records = callback.records
    assert records[-1]["eval_loss"] > records[-1]["train_loss"] + 0.5  # memorized, not learned
    recalibrated = [r["epoch"] for r in records if r["recalibrated"]]
    assert recalibrated == [1, 3, 6]  # backing off 1, 2, then 4 evaluations
    assert all(r["diagnosis"] == Verdict.UNEXPLAINED for r in records if r["recalibrated"])


def test_a_resumed_training_continues_the_hooks_decisions(tmp_path):
    class StopAfter(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.epoch >= 2

    def run(folder, callbacks, resume=None):
        callback = BNGuardCallback([AutoRecalibrate(**LOSS)])
        fit = trainer(folder, [callback, *callbacks], model=tiny_resnet(bn_momentum=0.0), epochs=4,
                      save_strategy="epoch", lr_scheduler_type="constant")
        fit.train(resume_from_checkpoint=resume)
        return callback

    whole = run(tmp_path / "whole", [])
    run(tmp_path / "part", [StopAfter()])
    assert (tmp_path / "part" / "checkpoint-8" / STATE_FILE).exists()
    resumed = run(tmp_path / "part", [], resume=str(tmp_path / "part" / "checkpoint-8"))

    assert any(r["recalibrated"] for r in whole.records)
    assert without_timings(resumed.records) == without_timings(whole.records)
    assert [h["reason"] for h in resumed.hooks[0].history] == [h["reason"] for h in whole.hooks[0].history]


def test_two_torchrun_processes_agree_bit_for_bit_and_only_rank_zero_logs(tmp_path):
    script = SUPPORT / "hf_two_processes.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    subprocess.run(torchrun, check=True, cwd=SUPPORT, timeout=300, env=support_env(WANDB_DIR=str(tmp_path)))
    assert_two_ranks_agree(tmp_path, samples=64)  # each rank recalibrates on its own 32
    assert "| Validation Loss |" in (tmp_path / "README.md").read_text()


def test_a_missing_transformers_names_the_extra():
    code = "import sys; sys.modules['transformers'] = None\nimport bnguard.integrations.transformers"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "pip install 'bnguard[hf]'" in result.stderr


def test_the_hooks_leave_training_bit_identical(tmp_path):
    def trained(callbacks):
        model = tiny_resnet(bn_momentum=0.0)
        trainer(tmp_path, callbacks, model=model, epochs=3).train()
        return parameters_of(model)

    hooks = [BNStatsLogger(every_n_steps=1, overview_metric="accuracy"), AutoRecalibrate(**LOSS), PreciseBN(),
             reevaluating_hook()]
    guarded = trained([BNGuardCallback(hooks)])
    assert_same_tensors(trained([]), guarded)


def test_hooks_are_checked_where_the_callback_is_built():
    with pytest.raises(TypeError, match="subclass bnguard.Hook"):
        BNGuardCallback([object()])
