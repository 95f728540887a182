"""What recalibrate() leaves out and refuses (skipped, frozen and non-finite layers, budgets, bad input), and
what its report and warnings say."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import bnguard
from helpers import assert_matches_reference, assert_same_tensors, buffers_of, reference_statistics, tiny_resnet


def test_nonfinite_batch_is_left_out_counted_and_warned():
    clean = [torch.randn(6, 1, 8, 8) for _ in range(3)]
    poisoned = clean[:1] + [torch.full((6, 1, 8, 8), float("nan"))] + clean[1:]
    model = tiny_resnet().eval()
    expected = copy.deepcopy(model)
    bnguard.recalibrate(expected, clean, progress=False)
    with pytest.warns(UserWarning, match="non-finite"):
        report = bnguard.recalibrate(model, poisoned, progress=False)
    assert all(layer.nonfinite_batches == 1 and layer.batches == 4 for layer in report.layers)
    for (name, got), want in zip(model.named_buffers(), expected.buffers()):
        if "running" in name:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            assert torch.isfinite(got).all()
    assert model[1].num_batches_tracked.item() == 3


def test_a_layer_that_sees_only_nonfinite_batches_keeps_its_statistics():
    bn = nn.BatchNorm1d(2)
    before = buffers_of(bn)
    with pytest.warns(UserWarning, match="non-finite"):
        report = bnguard.recalibrate(bn, [torch.tensor([[1.0, float("inf")], [2.0, 3.0]])], progress=False)
    assert report.layers[0].skipped == "no batch with finite statistics"
    assert_same_tensors(before, buffers_of(bn))


def test_skipped_layers_are_reported_and_untouched():
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.BatchNorm2d(3),  # excluded below, and in train mode: it must still be left alone
        nn.BatchNorm2d(3),
        nn.LazyBatchNorm2d(),
    )
    unused = nn.BatchNorm2d(3)
    model.add_module("unused", unused)
    model.forward = lambda x: model[4](model[3](model[2](model[1](model[0](x)))))
    model.train()
    excluded_before = buffers_of(model[2])
    report = bnguard.recalibrate(
        model, [torch.randn(4, 1, 6, 6)], modules=lambda name, layer: name != "2", progress=False
    )
    reasons = {layer.name: layer.skipped for layer in report.layers}
    assert reasons == {
        "1": "track_running_stats=False",
        "2": "excluded",
        "3": None,
        "4": "uninitialized lazy layer",
        "unused": "saw no input",
    }
    assert_same_tensors(excluded_before, buffers_of(model[2]))
    assert unused.num_batches_tracked.item() == 0 and torch.equal(unused.running_var, torch.ones(3))
    lazy = model[4]  # initialized by the passes, as any forward would, but its statistics not moved
    assert lazy.num_batches_tracked.item() == 0 and torch.equal(lazy.running_mean, torch.zeros(3))


def fine_tuning_resnet18():
    """torchvision's resnet18 set up for fine-tuning the usual way: train mode, then every BatchNorm layer of
    the backbone back in eval mode with its affine parameters frozen; the new head's BatchNorm trains."""
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # "pretrained" statistics, not the defaults
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-1, 1)
                layer.running_var.uniform_(0.5, 2)
    model.fc = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    model.train()
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.eval()
            layer.weight.requires_grad_(False)
            layer.bias.requires_grad_(False)
    return model


def test_frozen_batchnorm_keeps_its_statistics_unless_included():
    model = fine_tuning_resnet18()
    before = buffers_of(model)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    reference = reference_statistics(model, batches, only={"fc.1"})
    report = bnguard.recalibrate(model, batches, progress=False)
    assert [layer.name for layer in report.recalibrated] == ["fc.1"]
    assert all(layer.skipped.startswith("frozen") for layer in report.skipped) and len(report.skipped) == 20
    assert_same_tensors({k: v for k, v in before.items() if not k.startswith("fc.")},
                        {k: v for k, v in buffers_of(model).items() if not k.startswith("fc.")})
    assert_matches_reference(model, reference)
    assert not model.bn1.training and model.fc[1].training  # modes as they were
    everything = fine_tuning_resnet18()
    assert len(bnguard.recalibrate(everything, batches, include_frozen=True, progress=False).recalibrated) == 21


def test_modules_given_as_layers_and_rejected_when_not_batchnorm():
    model = tiny_resnet()
    before = buffers_of(model)
    report = bnguard.recalibrate(model, [torch.randn(4, 1, 8, 8)], modules=[model[1]], progress=False)
    assert [layer.name for layer in report.recalibrated] == ["1"]
    assert not torch.equal(before["1.running_var"], model[1].running_var)
    assert torch.equal(before["3.bn1.running_var"], model[3].bn1.running_var)
    with pytest.raises(ValueError, match="modules must select BatchNorm layers"):
        bnguard.recalibrate(model, [torch.randn(4, 1, 8, 8)], modules=[model[0]], progress=False)


def test_budgets_stop_at_whichever_comes_first():
    batches = [torch.randn(5, 2) for _ in range(10)]
    assert bnguard.recalibrate(nn.BatchNorm1d(2), batches, num_batches=3, progress=False).batches == 3
    by_samples = bnguard.recalibrate(nn.BatchNorm1d(2), batches, num_samples=12, progress=False)
    assert (by_samples.batches, by_samples.samples) == (3, 15)  # the batch that reaches 12 is used whole
    both = bnguard.recalibrate(nn.BatchNorm1d(2), batches, num_samples=100, num_batches=2, progress=False)
    assert both.batches == 2


@pytest.mark.parametrize("kwargs, name", [({"num_samples": 0}, "num_samples"), ({"num_batches": -1}, "num_batches")])
def test_bad_budgets_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bnguard.recalibrate(nn.BatchNorm1d(2), [torch.randn(4, 2)], **kwargs)


def test_empty_iterable_raises_and_changes_nothing():
    model = tiny_resnet()
    before = buffers_of(model)
    with pytest.raises(ValueError, match="batches is empty"):
        bnguard.recalibrate(model, [], progress=False)
    assert_same_tensors(before, buffers_of(model))


def test_model_without_batchnorm_warns_and_returns_empty_report():
    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        report = bnguard.recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    assert report.layers == [] and report.batches == 0


def test_report_table_and_dict():
    model = tiny_resnet()
    report = bnguard.recalibrate(model, [torch.randn(4, 1, 8, 8) + 5], progress=False)
    text = str(report)
    assert text.splitlines()[0].startswith("Recalibrated 6 of 6 BatchNorm layers from 1 batches (4 samples)")
    assert "3.bn1" in text
    as_dict = report.to_dict()
    assert as_dict["batches"] == 1 and len(as_dict["layers"]) == 6
    first = report.layers[0]
    assert first.mean_shift_max >= first.mean_shift_mean > 0
    assert first.var_log_ratio_max >= first.var_log_ratio_mean >= 0


def test_warnings_point_at_the_callers_line():
    with pytest.warns(UserWarning, match="no BatchNorm layer") as caught:
        bnguard.recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match="non-finite statistics") as caught:
        bnguard.recalibrate(nn.BatchNorm1d(2), [torch.randn(4, 2), torch.full((4, 2), float("nan"))], progress=False)
    assert caught[0].filename == __file__


def test_a_model_on_the_meta_device_is_refused_before_any_pass():
    with torch.device("meta"):
        model = tiny_resnet()

    def never():
        raise AssertionError("no batch may be drawn")
        yield

    with pytest.raises(ValueError, match="on the meta device .* materialize it"):
        bnguard.recalibrate(model, never(), progress=False)


def test_a_selection_of_no_layer_says_so():
    model = tiny_resnet()
    before = buffers_of(model)
    with pytest.warns(UserWarning, match="modules= selects none of the model's 6 BatchNorm layers"):
        report = bnguard.recalibrate(model, [torch.randn(4, 1, 8, 8)], modules=lambda name, layer: False,
                                     progress=False)
    assert report.recalibrated == [] and {layer.skipped for layer in report.layers} == {"excluded"}
    assert_same_tensors(before, buffers_of(model))


def test_instance_norm_with_running_statistics_is_named_as_not_recalibrated():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.InstanceNorm2d(3, track_running_stats=True), nn.BatchNorm2d(3),
                          nn.GroupNorm(1, 3))
    before = buffers_of(model[1])
    with pytest.warns(UserWarning, match="InstanceNorm layers with running statistics are not recalibrated: 1$"):
        report = bnguard.recalibrate(model, [torch.randn(4, 1, 6, 6)], progress=False)
    assert [layer.name for layer in report.recalibrated] == ["2"]
    assert_same_tensors(before, buffers_of(model[1]))


def test_a_batch_of_one_is_left_out_where_batchnorm_cannot_normalize_it():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [torch.randn(8, 3) + 2, torch.randn(8, 3) - 1, torch.randn(1, 3)]
    expected = copy.deepcopy(model)
    bnguard.recalibrate(expected, batches[:2], progress=False)
    with pytest.warns(UserWarning, match=r"2 BatchNorm layer\(s\) got batches with one value per channel"):
        report = bnguard.recalibrate(model, batches, progress=False)
    assert_same_tensors(buffers_of(expected), buffers_of(model))
    assert [(layer.batches, layer.one_value_batches) for layer in report.layers] == [(2, 1), (2, 1)]
    assert "1 one-value batches left out" in str(report) and report.batches == 3
    assert all(layer.training for layer in model.modules())
