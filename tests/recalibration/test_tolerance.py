"""recalibrate(tolerance=...): error bounds from the spread between batches, and stopping on them."""

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import bnguard
from bnguard.recalibration import stopping
from bnguard.recalibration.stopping import CHECK_GROWTH, CHECK_SPACING, FIRST_CHECK, joint_bounds
from bnguard.stats.confidence import sidak_quantile, t_widening, two_sided_t_quantile
from helpers import assert_same_tensors, buffers_of, tiny_resnet


def test_t_quantiles_match_the_tables():
    assert two_sided_t_quantile(0.95, 1) == pytest.approx(12.706204736174693, rel=1e-10)
    assert two_sided_t_quantile(0.95, 3) == pytest.approx(3.182446305283708, rel=1e-10)
    assert two_sided_t_quantile(0.99, 10) == pytest.approx(3.169272672616951, rel=1e-10)
    assert two_sided_t_quantile(0.95, 400) == pytest.approx(1.965912343229463, rel=1e-6)
    # Sidak: each of 16 estimates gets 0.95 ** (1 / 16) of the normal; t widens it, one batch bounds nothing.
    assert sidak_quantile(16) == pytest.approx(2.947775, abs=1e-6)
    assert sidak_quantile(1) == pytest.approx(1.959963984540054, rel=1e-12)
    assert t_widening(16, 31) * sidak_quantile(16) == pytest.approx(two_sided_t_quantile(0.95 ** (1 / 16), 30))
    assert t_widening(16, 1) == math.inf


def exact_joint_bound(scales):
    """The B with prod_k P(|Z| <= B / s_k) = 95%, by plain bisection on math.erfc."""
    low, high = 0.0, 100 * max(scales)
    for _ in range(200):
        middle = (low + high) / 2
        log_coverage = sum(math.log1p(-math.erfc(middle / s / math.sqrt(2))) for s in scales if s > 0)
        low, high = (low, middle) if log_coverage >= math.log(0.95) else (middle, high)
    return high


@pytest.mark.parametrize("kind", ["alike", "lognormal", "one dominates", "two scales"])
def test_joint_bounds_are_the_exact_95_percent_root(kind):
    generator = torch.Generator().manual_seed(0)
    sizes = [1, 16, 300, 2000]
    count = sum(sizes)
    errors = {
        "alike": torch.rand(count, generator=generator, dtype=torch.float64) + 0.5,
        "lognormal": (torch.randn(count, generator=generator, dtype=torch.float64) * 1.5).exp(),
        "one dominates": torch.rand(count, generator=generator, dtype=torch.float64) * 1e-3 + torch.tensor(
            sum(([1.0] + [0.0] * (n - 1) for n in sizes), []), dtype=torch.float64),
        "two scales": torch.where(torch.rand(count, generator=generator) < 0.1, 1.0, 0.3).double(),
    }[kind]
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    widening = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    bounds = joint_bounds(errors, index, widening)
    exact = [exact_joint_bound((errors[index == i] * widening[i]).tolist()) for i in range(len(sizes))]
    torch.testing.assert_close(bounds, torch.tensor(exact, dtype=torch.float64), rtol=1e-9, atol=0)


def test_joint_bounds_of_exact_and_unknown_estimates():
    errors = torch.tensor([0.0, 0.0, 0.5, 0.0, math.inf, 1.0], dtype=torch.float64)
    bounds = joint_bounds(errors, torch.tensor([0, 0, 1, 1, 2, 2]), torch.ones(3, dtype=torch.float64))
    assert bounds[0] == 0 and bounds[2] == math.inf
    assert bounds[1].item() == pytest.approx(0.5 * two_sided_t_quantile(0.95, 10**9), rel=1e-6)


def coverage(make_batch, layer, mean, var, tolerance, runs=200):
    """How often the stated bound held against the known limit, and the median batches used."""
    held, used = 0, []
    for seed in range(runs):
        generator = torch.Generator().manual_seed(seed)
        bn = copy.deepcopy(layer)
        report = bnguard.recalibrate(bn, (make_batch(generator) for _ in range(10_000)), tolerance=tolerance,
                                     progress=False)
        assert report.stopped == "tolerance met" and report.error_bound <= tolerance
        error = torch.maximum((bn.running_mean.double() - mean).abs() / math.sqrt(var + bn.eps),
                              (bn.running_var.double() - var).abs() / (var + bn.eps)).max().item()
        held += error <= report.error_bound
        used.append(report.batches)
    return held / runs, sorted(used)[runs // 2]


def test_the_bound_holds_in_about_95_percent_of_runs_with_a_known_limit():
    # Independent values: mean 3, variance 4 in each of 8 channels.
    flat = coverage(lambda g: torch.randn(16, 8, generator=g) * 2 + 3, nn.BatchNorm1d(8), 3.0, 4.0, 0.1)
    # One offset per image and channel plus a little pixel noise: the 36 pixels of an image are nearly one
    # value, so a bound from the element count would be 6 times too small. Mean 0, variance 1.01.
    pixels = coverage(lambda g: torch.randn(16, 8, 1, 1, generator=g) + 0.1 * torch.randn(16, 8, 6, 6, generator=g),
                      nn.BatchNorm2d(8), 0.0, 1.01, 0.1)
    for held, batches in (flat, pixels):
        assert 0.9 <= held <= 0.99, (held, batches)


def image_batches(count, size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 8, 8, generator=generator) * 2 + 1 for _ in range(count)]


def resnet():
    torch.manual_seed(0)
    return tiny_resnet()


def test_tolerance_stops_at_the_first_check_within_it_with_the_statistics_of_the_batches_used():
    batches = image_batches(300)
    model = resnet()
    report = bnguard.recalibrate(model, batches, tolerance=0.3, progress=False)
    assert report.stopped == "tolerance met" and report.tolerance == 0.3
    assert report.error_bound <= 0.3 and all(layer.error_bound <= 0.3 for layer in report.recalibrated)
    assert report.error_bound == max(layer.error_bound for layer in report.recalibrated)
    checks = [FIRST_CHECK]
    while checks[-1] < report.batches:
        checks.append(checks[-1] + max(CHECK_SPACING, checks[-1] // CHECK_GROWTH))
    assert checks[-1] == report.batches < 300, checks

    same = resnet()  # bit-identical to recalibrating exactly those batches, whose bound is the one reported
    full = bnguard.recalibrate(same, batches[:report.batches], progress=False)
    assert_same_tensors(buffers_of(model), buffers_of(same))
    assert [layer.error_bound for layer in full.recalibrated] == [layer.error_bound for layer in report.recalibrated]
    assert full.stopped == "end of data" and full.tolerance is None
    earlier = bnguard.recalibrate(resnet(), batches[:checks[-2]], progress=False)
    assert earlier.error_bound > 0.3  # the check before did not stop


def test_caps_and_the_end_of_data_come_first_when_the_tolerance_is_out_of_reach():
    batches = image_batches(12)
    by_batches = bnguard.recalibrate(resnet(), batches, tolerance=1e-4, num_batches=10, progress=False)
    assert (by_batches.stopped, by_batches.batches) == ("num_batches reached", 10)
    by_samples = bnguard.recalibrate(resnet(), batches, tolerance=1e-4, num_samples=50, progress=False)
    assert (by_samples.stopped, by_samples.samples) == ("num_samples reached", 56)
    ended = bnguard.recalibrate(resnet(), batches, tolerance=1e-4, progress=False)
    assert (ended.stopped, ended.batches) == ("end of data", 12)
    assert ended.error_bound > 1e-4
    summary = ended.to_dict()
    assert (summary["tolerance"], summary["stopped"]) == (1e-4, "end of data")
    assert summary["error_bound"] == ended.error_bound
    assert "stopped: end of data" in str(ended) and "(tolerance 0.0001)" in str(ended)


def test_one_batch_bounds_nothing():
    report = bnguard.recalibrate(resnet(), image_batches(1), tolerance=0.5, progress=False)
    assert report.stopped == "end of data"
    assert report.error_bound is None and all(layer.error_bound is None for layer in report.recalibrated)


def test_the_bounds_are_computed_once_for_all_layers_when_first_read(monkeypatch):
    solved = []
    monkeypatch.setattr(stopping, "joint_bounds", lambda *args: solved.append(args) or joint_bounds(*args))
    batches = image_batches(12)
    report = bnguard.recalibrate(resnet(), batches, progress=False)
    assert solved == []  # the statistics are written, the bounds not yet computed
    first = report.recalibrated[-1].error_bound
    assert len(solved) == 1 and 0 < first < math.inf
    bounds = [layer.error_bound for layer in report.recalibrated]
    assert len(solved) == 1 and bounds[-1] == first and report.error_bound == max(bounds)
    unread = bnguard.recalibrate(resnet(), batches, progress=False)
    assert pickle.loads(pickle.dumps(unread)).layers == report.layers  # pickled with its bounds, computed on the way
    assert bnguard.LayerReport("bn").error_bound is None
    assert bnguard.LayerReport("bn", error_bound=0.2) == bnguard.LayerReport("bn", error_bound=lambda: 0.2)


def test_an_ordered_stream_is_named_and_a_shuffled_one_is_not():
    generator = torch.Generator().manual_seed(2)
    drifting = [torch.randn(8, 1, 8, 8, generator=generator) + step / 10 for step in range(40)]
    with pytest.warns(UserWarning, match=r"batches look ordered.*shuffle=True"):
        bnguard.recalibrate(resnet(), drifting, progress=False)
    order = torch.randperm(40, generator=generator).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnguard.recalibrate(resnet(), [drifting[i] for i in order], progress=False)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (2, ValueError), (math.nan, ValueError),
                                        ("0.1", TypeError), (True, TypeError)])
def test_a_tolerance_outside_zero_to_one_is_refused_before_anything_runs(bad, error):
    model = resnet()
    before = buffers_of(model)
    with pytest.raises(error, match=r"tolerance must be a number in \(0, 1\] or None"):
        bnguard.recalibrate(model, image_batches(3), tolerance=bad, progress=False)
    assert_same_tensors(before, buffers_of(model))
