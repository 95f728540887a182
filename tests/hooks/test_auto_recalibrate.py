import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnguard
from bnguard import AutoRecalibrate, Hook, Verdict
from helpers import assert_same_tensors, buffers_of, launch_two_processes, tiny_resnet, toy_data, toy_loop

STALE, UNEXPLAINED = Verdict.STALE, Verdict.UNEXPLAINED


def freeze_statistics(loop):
    """BN momentum 0: the running statistics stay at their initial 0 / 1 while the weights learn."""
    for module in loop.model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.0


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def trained_model_with_stale_statistics():
    torch.manual_seed(0)
    model = tiny_resnet()
    data = toy_data(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for images, labels in DataLoader(data, batch_size=16, shuffle=True):
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():  # make the statistics stale: shift them well away from what the weights produce
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean += 2.0
                module.running_var *= 4.0
    return model, data


def accuracy(model, data):
    images, labels = data.tensors
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).double().mean().item()


def test_stale_statistics_trigger_a_recalibration_equal_to_recalibrate_alone():
    model, data = trained_model_with_stale_statistics()
    evaluation = toy_data(64, seed=1)
    batches = list(DataLoader(data, batch_size=16))
    expected = copy.deepcopy(model)
    bnguard.recalibrate(expected, batches, num_samples=48, progress=False)

    guard = AutoRecalibrate(num_samples=48)
    before = accuracy(model, evaluation)
    decision = guard.check(model, eval_value=before, train_value=accuracy(model, data) + 0.2,
                           evaluate=lambda: {"eval_acc": accuracy(model, evaluation)}, batches=batches)
    assert decision.triggered and decision.recalibrated and decision.diagnosis == STALE
    assert decision.eval_after >= before + 0.1
    assert decision.eval_after == accuracy(model, evaluation)
    assert decision.samples == 48 and decision.report.batches == 3
    assert_same_tensors(buffers_of(expected), buffers_of(model))


def test_by_default_it_stops_at_the_hooks_tolerance():
    model, _ = trained_model_with_stale_statistics()
    batches = list(DataLoader(toy_data(1024), batch_size=16))
    expected = copy.deepcopy(model)
    report = bnguard.recalibrate(expected, batches, tolerance=bnguard.HOOK_TOLERANCE, num_samples=4096,
                                 progress=False)
    decision = AutoRecalibrate().check(model, eval_value=0.1, train_value=0.9, evaluate=lambda: {"eval_acc": 0.9},
                                       batches=batches)
    assert decision.recalibrated and decision.report.stopped == "tolerance met"
    assert decision.samples == report.samples < 1024
    assert_same_tensors(buffers_of(expected), buffers_of(model))


def test_stale_statistics_in_the_loop_are_recalibrated_and_recorded(tmp_path, capsys):
    loop = toy_loop(tmp_path, hooks=[AutoRecalibrate()], epochs=2, n_train=64, n_eval=64)
    freeze_statistics(loop)
    loop.fit()
    for record in records(tmp_path):
        assert record["recalibrated"] is True and record["diagnosis"] == STALE
        assert record["eval_acc"] >= record["eval_acc_before_recal"] + 0.01
        assert record["recal_samples"] == 64 and record["recal_seconds"] > 0
    assert capsys.readouterr().out.count("recalibrated BatchNorm on 64 samples") == 2


def test_agreeing_train_and_eval_never_trigger():
    guard = AutoRecalibrate()

    def never():
        raise AssertionError("no batch may be drawn")

    for train, evaluation in [(0.90, 0.88), (0.95, 0.93), (0.97, 0.96)]:
        decision = guard.check(nn.BatchNorm1d(2), eval_value=evaluation, train_value=train,
                               evaluate=never, batches=never)
        assert not decision.triggered and not decision.recalibrated
    assert guard.policy.best == 0.96 and [h["reason"] for h in guard.history] == ["within thresholds"] * 3


def test_a_drop_below_the_best_triggers_and_loss_works_lower_is_better():
    guard = AutoRecalibrate(report_only=True)
    assert not guard.check(nn.BatchNorm1d(2), eval_value=0.90, evaluate=None, batches=None).triggered
    assert guard.check(nn.BatchNorm1d(2), eval_value=0.85, evaluate=None, batches=None).triggered
    loss_guard = AutoRecalibrate(report_only=True, monitor="loss", higher_is_better=False, gap_threshold=0.2)
    assert not loss_guard.check(nn.BatchNorm1d(2), eval_value=0.5, train_value=0.4, evaluate=None,
                                batches=None).triggered
    decision = loss_guard.check(nn.BatchNorm1d(2), eval_value=0.9, train_value=0.4, evaluate=None, batches=None)
    assert decision.triggered and decision.gap == pytest.approx(0.5) and decision.drop == pytest.approx(0.4)


def test_patience_waits_for_consecutive_evaluations():
    guard = AutoRecalibrate(report_only=True, patience=2)
    triggered = [guard.check(nn.BatchNorm1d(2), eval_value=e, train_value=1.0, evaluate=None, batches=None).triggered
                 for e in (0.9, 0.99, 0.9, 0.9, 0.9)]
    assert triggered == [False, False, False, True, True]


def memorizing_loop(tmp_path, guard, epochs=12, **kwargs):
    """16 training samples with random labels, memorized; an eval set of its own random labels."""
    g = torch.Generator().manual_seed(5)
    train = TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    evaluation = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    torch.manual_seed(0)
    model = tiny_resnet(width=8)
    return bnguard.Loop(model, torch.optim.Adam(model.parameters(), lr=2e-2), DataLoader(train, batch_size=16),
                        eval_loader=DataLoader(evaluation, batch_size=64), hooks=[guard], epochs=epochs,
                        output_dir=tmp_path, progress=False, **kwargs)


def test_genuine_overfitting_is_diagnosed_and_backed_off(tmp_path):
    guard = AutoRecalibrate(recovery_margin=0.05)
    memorizing_loop(tmp_path, guard).fit()
    rows = records(tmp_path)
    assert rows[-1]["train_acc"] == 1.0 and rows[-1]["eval_acc"] < 0.5  # memorized, not learned
    recalibrations = [r for r in rows if r["recalibrated"]]
    assert 1 <= len(recalibrations) <= 4  # back-off 1, 2, 4 evaluations: never every time
    assert recalibrations[-1]["diagnosis"] == UNEXPLAINED
    assert any("backing off" in r["reason"] for r in rows)


def test_probe_tells_overfitting_apart_before_recalibrating(tmp_path):
    guard = AutoRecalibrate(probe_samples=16)
    memorizing_loop(tmp_path, guard).fit()
    rows = records(tmp_path)
    probed = [r for r in rows if "statistics not stale" in r["reason"]]
    assert len(probed) >= 3 and all(r["diagnosis"] == UNEXPLAINED and not r["recalibrated"] for r in probed)
    assert sum(r["recalibrated"] for r in rows) <= 1  # at most while the statistics were still moving


def test_monitor_changes_no_buffer(tmp_path):
    plain = toy_loop(tmp_path / "plain", epochs=2, n_train=64, n_eval=64)
    freeze_statistics(plain)
    plain.fit()
    watched = toy_loop(tmp_path / "watched", hooks=[AutoRecalibrate(report_only=True)], epochs=2, n_train=64, n_eval=64)
    freeze_statistics(watched)
    watched.fit()
    assert_same_tensors(buffers_of(plain.model), buffers_of(watched.model))
    rows = records(tmp_path / "watched")
    assert all(r["recalibrated"] is False and "monitor mode" in r["reason"] for r in rows)
    assert [r["eval_acc"] for r in rows] == [r["eval_acc"] for r in records(tmp_path / "plain")]


def test_resume_makes_the_same_decisions(tmp_path):
    memorizing_loop(tmp_path / "whole", AutoRecalibrate(recovery_margin=0.05), checkpoint_every_epochs=1).fit()

    class Interrupt(Hook):
        def on_epoch_start(self, state):
            if state.epoch == 4:
                raise KeyboardInterrupt

    guard = AutoRecalibrate(recovery_margin=0.05)
    loop = memorizing_loop(tmp_path / "resumed", guard, checkpoint_every_epochs=1)
    loop.runner.hooks.append(Interrupt())
    with pytest.raises(KeyboardInterrupt):
        loop.fit()
    resumed_guard = AutoRecalibrate(recovery_margin=0.05)
    memorizing_loop(tmp_path / "resumed", resumed_guard, checkpoint_every_epochs=1).fit(resume_from="latest")

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "recal_seconds")} for r in rows]

    assert strip(records(tmp_path / "resumed")) == strip(records(tmp_path / "whole"))
    assert len(resumed_guard.history) == 12


def test_state_dict_round_trip():
    guard = AutoRecalibrate(report_only=True)
    guard.check(nn.BatchNorm1d(2), eval_value=0.8, train_value=0.9, evaluate=None, batches=None)
    guard.policy.best, guard.policy.cooldown, guard.policy.backoff = 0.8, 2, 4
    other = AutoRecalibrate()
    other.load_state_dict(copy.deepcopy(guard.state_dict()))
    assert other.state_dict() == guard.state_dict()


@pytest.mark.parametrize("kwargs, message", [({"max_cooldown": 0}, "max_cooldown must be"),
                                             ({"patience": 0}, "patience must be"),
                                             ({"num_samples": -5}, "num_samples must be"),
                                             ({"tolerance": 0}, r"tolerance must be a number in \(0, 1\] or None"),
                                             ({"tolerance": 1.5}, "tolerance must be")])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoRecalibrate(**kwargs)


def test_an_accuracy_in_percent_takes_the_default_thresholds_in_points(recwarn):
    model, data = trained_model_with_stale_statistics()
    batches = list(DataLoader(data, batch_size=16))

    def check(guard, eval_value, train_value):
        return guard.check(model, eval_value=eval_value, train_value=train_value, evaluate=lambda: eval_value,
                           batches=batches)

    def thresholds(guard):
        return guard.policy.gap_threshold, guard.policy.drop_threshold, guard.policy.recovery_margin

    fraction, percent = AutoRecalibrate(report_only=True), AutoRecalibrate(report_only=True)
    assert not check(fraction, 0.713, 0.72).triggered and not check(percent, 71.3, 72.0).triggered
    assert check(fraction, 0.713, 0.80).gap == pytest.approx(0.087) and check(percent, 71.3, 80.0).triggered
    assert thresholds(fraction) == (0.05, 0.03, 0.01) and thresholds(percent) == (5, 3, 1)
    assert [d["triggered"] for d in fraction.history] == [d["triggered"] for d in percent.history] == [False, True]
    resumed = AutoRecalibrate(report_only=True)
    resumed.load_state_dict(percent.state_dict())
    assert thresholds(resumed) == (5, 3, 1)
    stated = AutoRecalibrate(report_only=True, gap_threshold=5, drop_threshold=3, recovery_margin=1)
    assert check(stated, 71.3, 80.0).triggered and thresholds(stated) == (5, 3, 1)
    check(AutoRecalibrate(monitor="loss", higher_is_better=False, report_only=True), 2.5, 1.5)
    assert not recwarn.list


def test_thresholds_given_as_fractions_for_a_percentage_are_named_with_the_scaled_ones():
    model, data = trained_model_with_stale_statistics()
    guard = AutoRecalibrate(report_only=True, gap_threshold=0.1)
    with pytest.warns(UserWarning, match=r"acc is 71.3, above 1: a percentage\? The thresholds given are in the "
                                         r"metric's own units \(gap_threshold 0.1\), .* "
                                         r"AutoRecalibrate\(gap_threshold=10\)"):
        assert not guard.check(model, eval_value=71.3, train_value=71.34, evaluate=lambda: 71.3,
                               batches=[]).triggered
    assert (guard.policy.drop_threshold, guard.policy.recovery_margin) == (3, 1)  # the defaulted ones in points
    with pytest.warns(UserWarning, match=r"eval_acc is 85 and train_acc 0.9: a percentage beside a fraction\?"):
        AutoRecalibrate(report_only=True).check(model, eval_value=85.0, train_value=0.9, evaluate=lambda: 85.0,
                                                batches=[])


def test_needs_an_evaluation(tmp_path):
    with pytest.raises(bnguard.HookError, match="needs evaluation"):
        toy_loop(tmp_path, hooks=[AutoRecalibrate()], n_eval=0).fit()


def _decide_on_two_ranks(out_dir: str):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    loop = toy_loop(out_dir, hooks=[AutoRecalibrate()], epochs=2, n_train=64, n_eval=30, accelerator=accelerator)
    freeze_statistics(loop)
    loop.fit()
    guard = loop.runner.hooks[0]
    torch.save({"history": guard.history, "buffers": buffers_of(accelerator.unwrap_model(loop.model))},
               f"{out_dir}/rank{accelerator.process_index}.pt")


def test_two_processes_make_identical_decisions(tmp_path):
    launch_two_processes(_decide_on_two_ranks, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    strip = lambda h: [{k: v for k, v in d.items() if k != "seconds"} for d in h]  # noqa: E731
    assert strip(rank0["history"]) == strip(rank1["history"])
    assert [d["recalibrated"] for d in rank0["history"]] == [True, True]
    # at the hooks' tolerance, decided on merged figures: both ranks stopped at the check after 6 batches of 4
    assert rank0["history"][0]["samples"] == 48
    assert_same_tensors(rank0["buffers"], rank1["buffers"])


def test_a_model_without_batchnorm_says_so_once_and_records_no_recalibration(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    train = TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    evaluation = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))  # memorizes 16 random labels, no BatchNorm
    loop = bnguard.Loop(model, torch.optim.Adam(model.parameters(), lr=5e-2), DataLoader(train, batch_size=16),
                        eval_loader=DataLoader(evaluation, batch_size=64), hooks=[AutoRecalibrate()], epochs=8,
                        output_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match="nothing to recalibrate") as caught:
        loop.fit()
    assert len([w for w in caught if "nothing to recalibrate" in str(w.message)]) == 1
    rows = records(tmp_path)
    triggered = [r for r in rows if "nothing to recalibrate" in r["reason"]]
    assert len(triggered) >= 3 and all(r["recalibrated"] is False for r in rows)
    assert all(r["diagnosis"] is None and r["recal_samples"] == 0 for r in rows)
    assert "recalibrated BatchNorm on 0 samples" not in capsys.readouterr().out


def test_a_recalibration_that_makes_eval_worse_is_undone_bit_for_bit():
    model, data = trained_model_with_stale_statistics()
    evaluation = toy_data(64, seed=1)
    bnguard.recalibrate(model, list(DataLoader(data, batch_size=16)), progress=False)  # good statistics
    before = buffers_of(model)
    good = accuracy(model, evaluation)
    skewed = [(images * 3 + 4, labels) for images, labels in DataLoader(data, batch_size=16)]  # prepared wrongly
    guard = AutoRecalibrate(num_samples=64)
    decision = guard.check(model, eval_value=good, train_value=good + 0.2,
                           evaluate=lambda: {"eval_acc": accuracy(model, evaluation)}, batches=skewed)
    assert decision.reverted and not decision.recalibrated and decision.diagnosis is Verdict.WORSE
    assert decision.eval_after < good - 0.1 and "prepared (transforms, normalization)" in decision.reason
    assert_same_tensors(before, buffers_of(model))
    assert accuracy(model, evaluation) == good and guard.policy.cooldown == 1


def test_a_missing_train_metric_is_named_once():
    runner = bnguard.HookRunner([AutoRecalibrate(report_only=True)], model=nn.BatchNorm1d(2),
                                evaluate=lambda: {"eval_acc": 0.5})
    with pytest.warns(UserWarning, match=r"gave no train_acc \(train metrics: \['train_loss'\]\)") as caught:
        for value in (0.9, 0.5):
            runner.fire("on_eval_end", eval_metrics={"eval_acc": value}, train_metrics={"train_loss": 0.1})
    assert len(caught) == 1
    assert runner.hooks[0].history[-1]["drop"] == pytest.approx(0.4)  # falls below the best are still seen


def test_evaluation_by_steps_compares_with_the_epochs_train_metrics_so_far(tmp_path):
    guard = AutoRecalibrate(report_only=True)
    toy_loop(tmp_path, hooks=[guard], epochs=2, eval_every_steps=4).fit()
    assert len(guard.history) == 3 and all(d["gap"] is not None for d in guard.history)
