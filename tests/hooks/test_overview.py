"""The at-a-glance section: what an offline W&B run and a TensorBoard event file hold, and the PNG."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnguard import AutoRecalibrate, BNStatsLogger, RecalibrationReport
from bnguard.hooks.overview import NEVER, Overview, due
from bnguard.recalibration.report import LayerReport
from helpers import toy_loop
from wandb_log import history, offline_run_dir


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def table(run_dir, row, key):
    return json.loads((run_dir / "files" / row[f"{key}/path"]).read_text())


def stale_loop(tmp_path, logger, **kwargs):
    loop = toy_loop(tmp_path, hooks=[logger, AutoRecalibrate()], epochs=4, n_train=64, n_eval=32, **kwargs)
    for module in loop.model.modules():  # statistics that never move: stale as soon as the weights learn
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.0
    return loop


def test_the_run_opens_with_accuracy_every_layer_per_statistic_and_the_staleness_heatmap(tmp_path):
    logger = BNStatsLogger(every_n_steps=4)
    stale_loop(tmp_path, logger, tracker="wandb").fit()
    run_dir, epochs = offline_run_dir(tmp_path), records(tmp_path)
    rows = history(run_dir)
    bn = list(logger.overview.layer_values["running_mean_mean"])
    assert len(bn) == 6  # tiny_resnet's BatchNorm layers

    accuracy = [r for r in rows if "at-a-glance/acc_table/path" in r]
    assert [r["_step"] for r in accuracy] == [e["step"] for e in epochs]  # redrawn after every epoch
    last = table(run_dir, accuracy[-1], "at-a-glance/acc_table")
    assert last["columns"] == ["step", "lineKey", "lineVal"]
    series = {key: [(x, y) for x, k, y in last["data"] if k == key] for key in {k for _, k, _ in last["data"]}}
    assert series["train"] == [(e["epoch"], e["train_acc"]) for e in epochs]
    assert series["eval"] == [(e["epoch"], e["eval_acc"]) for e in epochs]
    as_trained = [(e["epoch"], e["eval_acc_before_recal"] if e["recalibrated"] else e["eval_acc"]) for e in epochs]
    assert series["eval, statistics as trained"] == as_trained
    assert any(e["recalibrated"] for e in epochs)  # the two eval lines part somewhere

    for statistic in ("running_mean_mean", "running_mean_std", "log_running_var_mean"):
        logged = [r for r in rows if f"at-a-glance/{statistic}_table/path" in r]
        rounds = sorted({r["_step"] for r in rows if f"bn/{bn[0]}/{statistic}" in r})  # layer-statistics rounds
        due_at = [e["step"] for e in epochs if due(sum(s <= e["step"] for s in rounds), NEVER)]
        assert [r["_step"] for r in logged] == sorted({*due_at, epochs[-1]["step"]})  # as due, and at the end
        data = table(run_dir, logged[-1], f"at-a-glance/{statistic}_table")["data"]
        assert sorted({k for _, k, _ in data}) == sorted(bn)  # one line per layer, in one chart
        steps = sorted({x for x, _, _ in data})
        assert len(data) == len(bn) * len(steps)
        for step, layer, value in data:  # the same numbers as the per-layer scalars, which stay in bn/
            assert value == pytest.approx(next(r for r in rows if r["_step"] == step and
                                               f"bn/{layer}/{statistic}" in r)[f"bn/{layer}/{statistic}"])

    heatmaps = [r for r in rows if r.get("at-a-glance/staleness/_type") == "image-file"]
    recalibrated_steps = [e["step"] for e in epochs if e["recalibrated"]]
    assert [r["_step"] for r in heatmaps] == sorted({*recalibrated_steps, epochs[-1]["step"]})  # each, and the end
    assert all(r["at-a-glance/staleness/height"] > 100 and r["at-a-glance/staleness/width"] > 300 for r in heatmaps)
    assert logger.save_staleness(tmp_path / "staleness.png").stat().st_size > 5_000


def test_tensorboard_gets_the_heatmap_as_an_image(tmp_path):
    stale_loop(tmp_path, BNStatsLogger(every_n_steps=4), tracker="tensorboard").fit()
    (event_file,) = (tmp_path / "tensorboard").glob("*/events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("at-a-glance/staleness")
    recalibrated_steps = [e["step"] for e in records(tmp_path) if e["recalibrated"]]
    assert [i.step for i in images][: len(recalibrated_steps)] == recalibrated_steps
    assert images[-1].width > 300 and images[-1].height > 100


def test_the_heatmap_holds_each_recalibration_of_each_layer():
    overview = Overview()
    for step, shifts in ((10, (0.5, 2.0)), (20, (0.1, 0.0))):
        layers = [LayerReport(name=name, samples=8, batches=1, mean_shift_max=shift, var_log_ratio_max=0.0)
                  for name, shift in zip(("a", "b"), shifts)]
        overview.add_recalibration(step, RecalibrationReport(layers=layers, batches=1, samples=8, seconds=0.1))
    assert overview.recalibrations == [(10, {"a": 0.5, "b": 2.0}), (20, {"a": 0.1, "b": 0.0})]
    image = overview.staleness_image()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    figure = overview.staleness_figure()
    grid = figure.axes[0].images[0].get_array()
    assert grid.tolist() == [[0.5, 0.1], [2.0, 0.0]]  # layers down, recalibrations across
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["10", "20"]


def test_without_recalibrations_or_metrics_nothing_is_drawn(tmp_path):
    overview = Overview()
    assert overview.staleness_image() is None and overview.save_staleness(tmp_path / "x.png") is None
    assert overview.add_epoch(1, {}, {"eval_loss": 0.3}, {}) is False and overview.epochs == []


def test_an_overview_metric_the_evaluation_never_gives_is_said_once(recwarn):
    from bnguard import HookRunner

    logger = BNStatsLogger(overview_metric="top1")
    runner = HookRunner([logger], model=nn.BatchNorm1d(2))
    for epoch in range(3):
        runner.fire("on_epoch_start", epoch=epoch, record={}, eval_metrics={})
        runner.fire("on_epoch_end", eval_metrics={"eval_acc": 0.5} if epoch else {})
    said = [str(w.message) for w in recwarn if "overview_metric='top1'" in str(w.message)]
    assert said == ["BNStatsLogger(overview_metric='top1'): the evaluation gives no eval_top1 (it gives ['eval_acc']), "
                    "so the at-a-glance accuracy chart stays empty: pass overview_metric= the name of one of those, "
                    "without 'eval_'"]


def test_a_long_history_is_thinned_evenly_and_the_heatmap_keeps_the_latest_recalibrations():
    from bnguard.hooks.overview import MAX_COLUMNS, MAX_POINTS

    overview = Overview()
    report = RecalibrationReport(layers=[LayerReport("a", mean_shift_max=1.0)])
    for step in range(1, 3001):
        overview.add_layer_statistics(step, {"bn/a/running_mean_mean": float(step)})
        overview.add_layer_statistics(step, {"bn/a/running_mean_mean": float(-step)})  # after a recalibration
        overview.add_epoch(step, {"train_acc": 0.5}, {"eval_acc": 0.5}, {})
        overview.add_recalibration(step, report)
    steps = overview.layer_steps
    assert MAX_POINTS <= len(steps) <= 2 * MAX_POINTS and steps[0] == 1
    assert len({b - a for a, b in zip(steps, steps[1:])}) == 1  # evenly spaced
    assert overview.layer_values["running_mean_mean"]["a"] == [-float(s) for s in steps]  # the replacing round
    assert MAX_POINTS <= len(overview.epochs) <= 2 * MAX_POINTS
    assert [step for step, _ in overview.recalibrations] == list(range(3001 - MAX_COLUMNS, 3001))
    restored = Overview()
    restored.load_state_dict(overview.state_dict())
    restored.add_layer_statistics(3001, {"bn/a/running_mean_mean": 1.0})
    overview.add_layer_statistics(3001, {"bn/a/running_mean_mean": 1.0})
    assert restored.state_dict() == overview.state_dict()
    assert [n for n in range(1, 300) if due(n, 64)] == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]
    assert [n for n in range(1, 100) if due(n, 16, first=64)] == list(range(1, 65)) + [80, 96]
    assert [n for n in range(1, 1100) if due(n, NEVER)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
