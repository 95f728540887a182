"""BNStatsLogger and log_bn_stats, read back from real offline W&B runs and TensorBoard event files."""

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import bnguard
from bnguard import Hook
from helpers import tiny_resnet, toy_loop
from wandb_log import history, offline_run_dir

LAYERS = {"1": 4, "3.bn1": 4, "3.bn2": 4, "5.bn1": 8, "5.bn2": 8, "5.project.1": 8}


def histogram_rows(rows, key):
    return {r["_step"]: r for r in rows if r.get(f"{key}/_type") == "histogram"}


def test_every_layer_histograms_at_the_expected_steps(tmp_path):
    logger = bnguard.BNStatsLogger(every_n_steps=4, bins=8)
    loop = toy_loop(tmp_path, hooks=[logger], epochs=2, tracker="wandb")
    loop.fit()
    rows = history(offline_run_dir(tmp_path))
    for name, channels in LAYERS.items():
        for stat in ("running_mean", "running_var"):
            logged = histogram_rows(rows, f"bn/{name}/{stat}")
            assert sorted(logged) == [4, 6, 8, 12]  # every 4 steps, and after the evaluations at 6 and 12
            for row in logged.values():
                assert sum(row[f"bn/{name}/{stat}/values"]) == channels
                assert len(row[f"bn/{name}/{stat}/bins"]) == 9
    # The last histograms are those of the final buffers, bin for bin.
    model = loop.accelerator.unwrap_model(loop.model)
    for name, layer in model.named_modules():
        if isinstance(layer, nn.BatchNorm2d):
            row = histogram_rows(rows, f"bn/{name}/running_var")[12]
            values = layer.running_var.double()
            edges = row[f"bn/{name}/running_var/bins"]
            assert edges[0] == pytest.approx(values.min().item()) and edges[-1] == pytest.approx(values.max().item())
            expected = torch.histc(values, bins=8, min=edges[0], max=edges[-1]).long().tolist()
            assert row[f"bn/{name}/running_var/values"] == expected
            last = max((r for r in rows if f"bn/{name}/running_mean_mean" in r), key=lambda r: r["_step"])
            assert last[f"bn/{name}/running_mean_mean"] == pytest.approx(layer.running_mean.double().mean().item())
            assert last[f"bn/{name}/running_mean_std"] == pytest.approx(layer.running_mean.double().std().item())
            assert last[f"bn/{name}/log_running_var_mean"] == pytest.approx(values.log().mean().item())


@pytest.mark.parametrize("input_size, step, shape", [(None, 1, "[4, 8, 4, 4]"), ((2, 1, 8, 8), 0, "[2, 8, 4, 4]")])
def test_layer_table_is_logged_at_the_first_step_or_at_fit_start_given_an_input_size(tmp_path, capsys, input_size,
                                                                                   step, shape):
    toy_loop(tmp_path, hooks=[bnguard.BNStatsLogger(input_size=input_size)], epochs=1, tracker="wandb").fit()
    (table,) = [r for r in history(offline_run_dir(tmp_path)) if "bn/layers/_type" in r]
    assert table["_step"] == step and table["bn/layers/_type"] == "table-file"
    assert (table["bn/layers/nrows"], table["bn/layers/ncols"]) == (6, 7)
    out = capsys.readouterr().out
    assert "Total params" in out and shape in out  # the torchinfo summary, with the inputs' shapes


class PoisonAtStep(Hook):
    def on_step_end(self, state):
        if state.step == 2:
            state.unwrapped_model[3].bn2.running_var[1] = float("nan")
            state.unwrapped_model[3].bn2.running_mean[2] = float("inf")


def test_nonfinite_channels_are_counted_and_left_out(tmp_path):
    toy_loop(tmp_path, hooks=[PoisonAtStep(), bnguard.BNStatsLogger(every_n_steps=2, on_eval=False)],
             epochs=1, tracker="wandb").fit()
    rows = history(offline_run_dir(tmp_path))
    counts = {r["_step"]: r["bn/3.bn2/nonfinite"] for r in rows if "bn/3.bn2/nonfinite" in r}
    assert counts == {2: 2, 4: 2, 6: 2}  # NaN/Inf buffers stay so under the moving average
    for row in histogram_rows(rows, "bn/3.bn2/running_var").values():
        assert sum(row["bn/3.bn2/running_var/values"]) == 2
    assert all(sum(r["bn/1/running_var/values"]) == 4 for r in histogram_rows(rows, "bn/1/running_var").values())


def test_tensorboard_gets_the_histograms(tmp_path):
    toy_loop(tmp_path, hooks=[bnguard.BNStatsLogger(every_n_steps=3, bins=5)], epochs=1,
             tracker="tensorboard").fit()
    (event_file,) = (tmp_path / "tensorboard").glob("*/events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"histograms": 0})
    events.Reload()
    for name, channels in LAYERS.items():
        logged = events.Histograms(f"bn/{name}/running_mean")
        assert [h.step for h in logged] == [3, 6]
        assert all(h.histogram_value.num == channels == sum(h.histogram_value.bucket) for h in logged)
    assert [s.step for s in events.Scalars("bn/1/nonfinite")] == [3, 6]


def test_statistics_of_constant_and_lazy_layers():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm1d(), nn.BatchNorm1d(2, track_running_stats=False))
    stats = bnguard.bn_statistics(model, bins=4)
    assert set(k.split("/")[1] for k in stats) == {"0"}  # lazy and untracked layers are left out
    counts, edges = stats["bn/0/running_var"][:2]
    assert counts.tolist() == [0, 0, 3, 0] and np.allclose(edges, [0.5, 0.75, 1.0, 1.25, 1.5])
    assert stats["bn/0/running_mean_std"] == 0 and stats["bn/0/log_running_var_mean"] == 0


@pytest.mark.parametrize("bins", [1, 3, 8])
def test_all_layers_at_once_bin_as_histc_does_each_layer_values_on_the_edges_included(bins):
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(50), nn.BatchNorm2d(7), nn.BatchNorm1d(5, affine=False))
    model[0].running_mean.copy_(torch.randint(0, 5, (50,)) / 4)  # many values exactly on bin edges
    model[0].running_var.copy_(torch.rand(50) * 3)
    model[1].running_mean.copy_(torch.randn(7) * 1e4 + 100)
    model[1].running_var[3] = float("nan")  # channel 3 left out of both of layer 1's histograms
    model[2].running_var.fill_(2.0)
    stats = bnguard.bn_statistics(model, bins=bins, include_affine=True)
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            continue
        finite = torch.isfinite(layer.running_mean) & torch.isfinite(layer.running_var)
        tensors = {"running_mean": layer.running_mean[finite], "running_var": layer.running_var[finite]}
        if layer.affine:
            tensors.update(weight=layer.weight.detach(), bias=layer.bias.detach())
        for key, values in tensors.items():
            counts, edges, num, total, squares, minimum, maximum = stats[f"bn/{name}/{key}"]
            values = values.double()
            assert (minimum, maximum) == (values.min().item(), values.max().item())  # exact: no binning
            expected = torch.histc(values, bins=bins, min=float(edges[0]), max=float(edges[-1]))
            assert counts.tolist() == expected.long().tolist() and num == len(values), (name, key)
            assert total == pytest.approx(values.sum().item(), rel=1e-12, abs=1e-12)
            assert squares == pytest.approx(values.square().sum().item(), rel=1e-12)
        assert stats[f"bn/{name}/nonfinite"] == int((~finite).sum())
        assert stats[f"bn/{name}/running_mean_mean"] == pytest.approx(tensors["running_mean"].double().mean().item())


@pytest.mark.parametrize("bins", [0, 513, 2.5, True])
def test_invalid_bins(bins):
    with pytest.raises(ValueError, match="bins must be an integer from 1 to 512"):
        bnguard.BNStatsLogger(bins=bins)
    with pytest.raises(ValueError, match="bins must be"):
        bnguard.log_bn_stats(tiny_resnet(), 0, bins=bins)


def test_model_without_batchnorm_warns_once(tmp_path):
    logger = bnguard.BNStatsLogger()
    hooks = bnguard.HookRunner([logger], model=nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        hooks.fire("on_fit_start")
    assert bnguard.log_bn_stats(nn.Linear(2, 2), 0) == {}


def test_log_bn_stats_in_an_own_loop_logs_to_the_active_run(tmp_path):
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="own")
    logged = bnguard.log_bn_stats(tiny_resnet(), 7, bins=3)
    run.finish()
    (row,) = [r for r in history(offline_run_dir(tmp_path)) if "bn/1/running_mean/_type" in r]
    assert row["_step"] == 7 and row["bn/1/running_mean/values"] == logged["bn/1/running_mean"].counts.tolist()


def test_staleness_is_logged_after_each_recalibration(tmp_path):
    class Recalibrate(Hook):
        reports = []

        def on_epoch_end(self, state):
            self.reports.append(bnguard.recalibrate(state.model, state.train_batches(), progress=False))
            state.recalibrated(self.reports[-1])

    toy_loop(tmp_path, hooks=[bnguard.BNStatsLogger(every_n_steps=100), Recalibrate()], epochs=2,
             tracker="wandb").fit()
    rows = history(offline_run_dir(tmp_path))
    stale = {r["_step"]: r for r in rows if "bn/1/staleness_mean_shift_max" in r}
    assert sorted(stale) == [6, 12]
    for step, report in zip([6, 12], Recalibrate.reports):
        for layer in report.layers:
            assert stale[step][f"bn/{layer.name}/staleness_mean_shift_max"] == pytest.approx(layer.mean_shift_max)
            assert stale[step][f"bn/{layer.name}/staleness_log_var_ratio_max"] == pytest.approx(layer.var_log_ratio_max)
    # the recalibrated statistics are logged too, at the same step
    assert sorted(histogram_rows(rows, "bn/1/running_var")) == [6, 12]
