"""Non-finite training stops with a clear error; nothing non-finite is checkpointed; records stay JSON."""

import json
import math

import pytest
import torch
from torch import nn

import bnguard
from bnguard import AutoRecalibrate, Hook, Verdict
from bnguard.drivers.checkpoint import latest_checkpoint
from bnguard.utils.manifest import verify_checkpoint
from helpers import tiny_resnet, toy_data, toy_loop


def strict_records(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (path / "metrics.jsonl").read_text().splitlines()]


class PoisonWeights(Hook):
    """After step ``at``, a NaN in the first convolution: every later loss is NaN."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            with torch.no_grad():
                state.unwrapped_model[0].weight[0, 0, 0, 0] = float("nan")


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(bnguard.NonFiniteLossError, match=r"not finite \(NaN/Inf\) from step 10, in epoch 2"):
        toy_loop(tmp_path, hooks=[PoisonWeights(at=9)], epochs=3, checkpoint_every_epochs=1).fit()
    good = tmp_path / "checkpoints" / "epoch-0001"
    assert latest_checkpoint(tmp_path / "checkpoints") == good
    assert sorted((tmp_path / "checkpoints").iterdir()) == [good]
    verify_checkpoint(good)
    assert [r["epoch"] for r in strict_records(tmp_path)] == [1]


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    torch.manual_seed(0)
    model = tiny_resnet()
    model.spare = nn.Parameter(torch.zeros(2))  # not used by the forward: the loss stays finite

    class PoisonSpare(Hook):
        def on_epoch_end(self, state):
            if state.epoch == 1:
                with torch.no_grad():
                    state.unwrapped_model.spare[1] = float("inf")

    loader = torch.utils.data.DataLoader(toy_data(8), batch_size=4)
    loop = bnguard.Loop(model, torch.optim.SGD(model.parameters(), lr=0.01), loader, epochs=3, hooks=[PoisonSpare()],
                        checkpoint_every_epochs=1, output_dir=tmp_path, progress=False)
    with pytest.raises(FloatingPointError, match="parameter spare holds NaN/Inf: checkpoint epoch-0002 not written"):
        loop.fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]


class PoisonStatistics(Hook):
    """NaN running variances from epoch 2 on (the weights stay fine): eval-mode outputs are NaN."""

    def on_train_epoch_end(self, state):
        if state.epoch == 1:
            state.unwrapped_model[1].running_var[0] = float("nan")


def test_records_stay_json_when_eval_is_not_finite(tmp_path):
    toy_loop(tmp_path, hooks=[PoisonStatistics()], epochs=2).fit()
    rows = strict_records(tmp_path)
    assert math.isfinite(rows[0]["eval_loss"]) and rows[1]["eval_loss"] == "NaN"


def test_corrupt_statistics_are_recalibrated_and_called_stale(tmp_path):
    toy_loop(tmp_path, hooks=[PoisonStatistics(), AutoRecalibrate()], epochs=2).fit()
    last = strict_records(tmp_path)[-1]
    assert last["recalibrated"] is True and last["diagnosis"] == Verdict.STALE
    assert last["reason"].startswith("eval_loss not finite") and math.isfinite(last["eval_loss"])


def test_non_finite_outputs_are_not_blamed_on_overfitting_or_statistics():
    def never():
        raise AssertionError("no recalibration for a model that is itself broken")

    guard = AutoRecalibrate()
    decision = guard.check(nn.BatchNorm1d(2), eval_value=0.1, train_value=0.1, evaluate=never, batches=never,
                           nonfinite=["train_loss", "eval_loss"])
    assert decision.diagnosis is Verdict.NONFINITE and not decision.recalibrated
    assert "recalibration cannot fix" in decision.reason and guard.policy.best is None

    still = guard.check(nn.BatchNorm1d(2), eval_value=0.1, evaluate=lambda: {"eval_acc": 0.1, "eval_loss": math.nan},
                        batches=[torch.randn(4, 2)], nonfinite=["eval_loss"])
    assert still.recalibrated and still.diagnosis is Verdict.NONFINITE and guard.policy.cooldown == 1
