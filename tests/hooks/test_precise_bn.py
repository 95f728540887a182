"""PreciseBN: scheduled recalibration before evaluations."""

import copy
import json

import pytest
import torch

import bnguard
from bnguard import Hook, PreciseBN
from helpers import assert_same_tensors, buffers_of, toy_data, toy_loop


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


class Count(Hook):
    def __init__(self):
        self.reports = []

    def on_recalibrated(self, state):
        self.reports.append(state.recalibration)


def test_always_recalibrates_before_every_evaluation(tmp_path):
    counter = Count()
    reports = counter.reports
    toy_loop(tmp_path, hooks=[PreciseBN(), counter], epochs=3).fit()
    assert len(reports) == 3
    assert all(r["recalibrated"] and r["reason"] == "always" and r["recal_samples"] == 24 for r in records(tmp_path))


class Snapshot(Hook):
    """The buffers each evaluation sees, and the model right after the last training step."""

    def __init__(self):
        self.at_eval, self.after_training = [], None

    def on_train_epoch_end(self, state):
        self.after_training = copy.deepcopy(state.unwrapped_model)

    def on_eval_end(self, state):
        self.at_eval.append(buffers_of(state.unwrapped_model))


def test_every_second_evaluation_sees_exact_statistics(tmp_path):
    counter, snapshot = Count(), Snapshot()
    loop = toy_loop(tmp_path, hooks=[PreciseBN(every_n_evals=2), counter, snapshot], epochs=4)
    loop.fit()
    rows = records(tmp_path)
    assert [r["recalibrated"] for r in rows] == [False, True, False, True]
    assert rows[0]["reason"] == "not scheduled: every 2 evaluations"
    assert rows[1]["reason"] == "scheduled: every 2 evaluations" and rows[1]["recal_samples"] == 24
    assert len(counter.reports) == 2
    # the last evaluation saw the statistics recalibrate() gives for the final weights on the same draw
    expected = snapshot.after_training
    loop.train_batches.draws -= 1  # the loop's own source, replaying its last draw
    bnguard.recalibrate(expected, loop.train_batches(), num_samples=4096, progress=False)
    assert_same_tensors(buffers_of(expected), snapshot.at_eval[-1])


def test_needs_training_batches():
    runner = bnguard.HookRunner([PreciseBN()], model=torch.nn.BatchNorm1d(2))
    with pytest.raises(bnguard.HookError, match="PreciseBN needs training batches"):
        runner.fire("on_fit_start")


def test_the_default_tolerance_stops_early_with_the_statistics_recalibrate_gives(tmp_path):
    snapshot = Snapshot()
    loop = toy_loop(tmp_path, hooks=[PreciseBN(), snapshot], epochs=1, n_train=1024, batch_size=16)
    loop.fit()
    [row] = records(tmp_path)
    assert 0 < row["recal_samples"] < 1024
    expected = snapshot.after_training
    loop.train_batches.draws -= 1
    report = bnguard.recalibrate(expected, loop.train_batches(), tolerance=bnguard.HOOK_TOLERANCE,
                                 num_samples=4096, progress=False)
    assert (report.samples, report.stopped) == (row["recal_samples"], "tolerance met")
    assert report.error_bound <= bnguard.HOOK_TOLERANCE
    assert_same_tensors(buffers_of(expected), snapshot.at_eval[-1])


@pytest.mark.parametrize("tolerance, cap, samples", [(None, 4096, 1024), (None, 200, 208), (1e-6, 4096, 1024)])
def test_without_a_reachable_tolerance_the_cap_or_the_pass_decides(tmp_path, tolerance, cap, samples):
    toy_loop(tmp_path, hooks=[PreciseBN(tolerance=tolerance, num_samples=cap, monitor=None)], epochs=1,
             n_train=1024, batch_size=16).fit()  # the budget alone: no first-recalibration check
    assert records(tmp_path)[0]["recal_samples"] == samples


@pytest.mark.parametrize("kwargs, error", [({"every_n_evals": 0}, ValueError), ({"num_samples": 2.5}, TypeError),
                                           ({"tolerance": 0.0}, ValueError), ({"tolerance": "0.1"}, TypeError)])
def test_bad_settings(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        PreciseBN(**kwargs)


def test_resume_continues_the_schedule(tmp_path):
    whole = toy_loop(tmp_path / "whole", hooks=[PreciseBN(every_n_evals=2)], epochs=3, checkpoint_every_epochs=1)
    whole.fit()
    first = toy_loop(tmp_path / "resumed", hooks=[PreciseBN(every_n_evals=2)], epochs=1, checkpoint_every_epochs=1)
    first.fit()
    resumed = toy_loop(tmp_path / "resumed", hooks=[PreciseBN(every_n_evals=2)], epochs=3, checkpoint_every_epochs=1)
    resumed.fit(resume_from="latest")

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "recal_seconds")} for r in rows]

    assert strip(records(tmp_path / "resumed")) == strip(records(tmp_path / "whole"))


def test_evaluations_without_eval_start_are_named_once(tmp_path):
    from helpers import tiny_resnet, toy_data

    runner = bnguard.HookRunner([PreciseBN()], model=tiny_resnet(),
                                train_batches=lambda: torch.utils.data.DataLoader(toy_data(8), batch_size=4))
    runner.fire("on_fit_start")
    with pytest.warns(UserWarning, match="fire Event.EVAL_START before evaluating") as caught:
        for _ in range(2):
            runner.fire("on_eval_end", eval_metrics={"eval_acc": 0.5}, record={})
    assert len(caught) == 1
    assert runner.state.record == {"recalibrated": False, "recal_seconds": 0.0, "recal_samples": 0,
                                   "reason": "no EVAL_START was fired: nothing recalibrated"}


def test_a_first_recalibration_that_makes_eval_worse_is_undone_and_said(tmp_path):
    class Before(Hook):  # the statistics the first evaluation starts from
        def on_eval_start(self, state):
            self.buffers = getattr(self, "buffers", None) or buffers_of(state.unwrapped_model)

    before, snapshot = Before(), Snapshot()
    images, labels = toy_data(64).tensors
    unprepared = [(images[i:i + 8] * 50 + 20, labels[i:i + 8]) for i in range(0, 64, 8)]  # not normalized
    loop = toy_loop(tmp_path, hooks=[before, PreciseBN(), snapshot], epochs=2, recalibration_loader=unprepared)
    with pytest.warns(UserWarning, match=r"first recalibration made eval_loss worse .* not prepared like the "
                                         r"training batches"):
        loop.fit()
    first, second = records(tmp_path)
    assert not first["recalibrated"] and first["reason"].startswith("recalibration made eval_loss worse")
    assert second["recalibrated"] and second["reason"] == "always"  # checked once only
    assert_same_tensors(snapshot.at_eval[0], before.buffers)  # the first evaluation kept what it had


def test_a_first_recalibration_that_helps_is_kept_bit_for_bit(tmp_path):
    counter, snapshot = Count(), Snapshot()
    loop = toy_loop(tmp_path, hooks=[PreciseBN(every_n_evals=1), counter, snapshot], epochs=1)
    loop.fit()
    [row] = records(tmp_path)
    assert row["recalibrated"] and row["reason"] == "always"
    expected = snapshot.after_training
    loop.train_batches.draws -= 1
    bnguard.recalibrate(expected, loop.train_batches(), tolerance=bnguard.HOOK_TOLERANCE, num_samples=4096,
                        progress=False)
    assert_same_tensors(buffers_of(expected), snapshot.at_eval[-1])


def test_the_automatic_check_judges_by_losses_and_accuracies_never_by_timings():
    from bnguard.hooks.precise_bn import _candidates

    given = {"eval_runtime": 1.5, "eval_top1": 70.0, "eval_ema_loss": 0.3, "eval_samples_per_second": 9.0}
    assert _candidates("auto", given) == ["eval_loss", "eval_acc", "eval_top1", "eval_ema_loss"]
    assert _candidates("ema_acc", given) == ["eval_ema_acc"]
