"""recalibrate() computes the exact statistics: closed forms and float64 references, for every kind of layer
and model."""

import copy
import sys

import pytest
import torch
import torchvision
from torch import nn

import bnguard
from helpers import (
    ON_EACH_DEVICE,
    assert_matches_reference,
    assert_same_tensors,
    buffers_of,
    reference_statistics,
    resnet18_with_dropout,
    tiny_resnet,
    with_own_forward,
)


def ramp_batches(shape_tail: tuple[int, ...], sizes: list[int], channels: int = 3, offset: float = 0.0):
    """Channel c holds the values offset + c + 0, 1, 2, ... in order, split into batches of `sizes` samples:
    the pooled mean and unbiased variance of m consecutive integers are (m - 1) / 2 and m (m + 1) / 12."""
    per_sample = int(torch.tensor(shape_tail).prod()) if shape_tail else 1
    total = sum(sizes) * per_sample
    ramp = torch.arange(total, dtype=torch.float64).reshape(sum(sizes), *shape_tail)
    data = torch.stack([ramp + offset + c for c in range(channels)], dim=1).float()
    return list(torch.split(data, sizes)), total


@pytest.mark.parametrize(
    "layer, tail", [(nn.BatchNorm1d, ()), (nn.BatchNorm1d, (5,)), (nn.BatchNorm2d, (3, 2)), (nn.BatchNorm3d, (2, 2, 3))]
)
def test_closed_form_statistics_with_uneven_batches(layer, tail):
    bn = layer(3)
    batches, m = ramp_batches(tail, [5, 2, 9, 3])
    report = bnguard.recalibrate(bn, batches, progress=False)
    expected_mean = torch.tensor([(m - 1) / 2 + c for c in range(3)], dtype=torch.float64)
    assert torch.equal(bn.running_mean, expected_mean.float())
    expected_var = torch.full((3,), m * (m + 1) / 12, dtype=torch.float64)
    torch.testing.assert_close(bn.running_var.double(), expected_var, rtol=1e-7, atol=0)
    assert report.batches == 4 and report.samples == 19
    assert report.layers[0].samples == 19 and report.layers[0].batches == 4
    assert bn.num_batches_tracked.item() == 4


def test_uneven_splits_equal_the_single_batch_answer():
    data = torch.randn(37, 4, 3, 3) * 0.5 + 100 * 0.5  # mean 100 std
    whole, split = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    bnguard.recalibrate(whole, [data], progress=False)
    bnguard.recalibrate(split, list(torch.split(data, [1, 20, 6, 10])), progress=False)
    x = data.double().transpose(0, 1).reshape(4, -1)
    mean, var = x.mean(dim=1), x.var(dim=1)
    for bn in (whole, split):
        assert ((bn.running_var.double() - var).abs() / var).max() <= 1e-6
        assert (bn.running_mean.double() - mean).abs().max() <= torch.finfo(torch.float32).eps * 50 + 1e-6 * 0.5


@ON_EACH_DEVICE
@pytest.mark.parametrize("center, keep_modes", [(0.0, False), (100.0, False), (0.0, True), (100.0, True)])
def test_resnet18_matches_float64_reference(center, keep_modes, device):
    # Dropout is off during the passes by default; with keep_modes it stays on and the reference replays its
    # random stream.
    model = resnet18_with_dropout().train().to(device)
    batches = [torch.randn(n, 3, 32, 32, device=device) + center for n in (8, 8, 5)]
    reference = reference_statistics(model, batches, seed=7, keep_modes=keep_modes)
    torch.manual_seed(7)
    report = bnguard.recalibrate(model, batches, keep_modes=keep_modes, progress=False)
    assert len(report.recalibrated) == 20
    assert_matches_reference(model, reference)


@ON_EACH_DEVICE
def test_a_channels_last_model_matches_float64_reference(device):
    model = torchvision.models.resnet18(num_classes=10).train().to(device, memory_format=torch.channels_last)
    batches = [torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last) + 3
               for n in (8, 8, 5)]
    reference = reference_statistics(model, batches)
    bnguard.recalibrate(model, batches, progress=False)
    assert_matches_reference(model, reference)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_dropout_is_off_during_the_passes_unless_asked():
    model = resnet18_with_dropout().train()
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    default, kept = copy.deepcopy(model), copy.deepcopy(model)
    bnguard.recalibrate(default, batches, progress=False)
    bnguard.recalibrate(kept, batches, keep_modes=True, progress=False)
    assert not torch.equal(default.layer2[1][0].bn1.running_var, kept.layer2[1][0].bn1.running_var)
    assert torch.equal(default.layer1[0].bn1.running_var, kept.layer1[0].bn1.running_var)  # before any dropout


def test_a_layer_called_twice_pools_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(x) + self.bn(x * 3 + 10)

    model = Twice()
    x = torch.randn(16, 2)
    report = bnguard.recalibrate(model, [x], progress=False)
    union = torch.cat([x, x * 3 + 10]).double()
    torch.testing.assert_close(model.bn.running_mean.double(), union.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), union.var(0), rtol=1e-6, atol=0)
    assert report.layers[0].batches == 2 and report.layers[0].samples == 32


# 70 batches: past a chunk of 64 rows; 5: a chunk sized to the 5 batches, which the second layer fills twice
@pytest.mark.parametrize("count", [70, 5])
def test_layers_of_different_dtypes_and_call_counts_pool_exactly_past_a_chunk(count):
    class Mixed(nn.Module):  # a float32 layer called once per batch, a float64 one twice
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.BatchNorm1d(3), nn.BatchNorm1d(2).double()
            self.mix = nn.Linear(3, 2)

        def forward(self, x):
            h = self.mix(self.first(x)).double()
            return self.second(h) + self.second(h * 2 + 5)

    torch.manual_seed(0)
    model = Mixed().eval()
    batches = [torch.randn(3, 3) * 4 + 1 for _ in range(count)]  # the second layer: 2 * count calls
    reference = reference_statistics(model, batches)
    report = bnguard.recalibrate(model, batches, progress=False)
    assert model.second.running_var.dtype == torch.float64
    assert_matches_reference(model, reference)
    mean, var = reference["second"]
    torch.testing.assert_close(model.second.running_mean, mean, rtol=0, atol=1e-12)  # float64 all the way
    torch.testing.assert_close(model.second.running_var, var, rtol=1e-12, atol=0)
    assert [layer.batches for layer in report.layers] == [count, 2 * count]
    assert model.second.num_batches_tracked.item() == 2 * count


def test_batch_shapes_and_custom_forward():
    class KeywordModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, pixels, scale=1.0):
            return self.bn(pixels * scale)

    x = torch.randn(8, 3)
    results = []
    for batches, forward in [
        ([x], None),
        ([(x, torch.zeros(8))], None),
        ([{"pixels": x}], None),
        ([{"pixels": x / 2, "scale": 2.0}], None),
        ([{"image": x}], lambda model, batch: model(batch["image"])),
    ]:
        model = KeywordModel()
        bnguard.recalibrate(model, batches, forward=forward, progress=False)
        results.append(model.bn.running_var)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=0)


@ON_EACH_DEVICE
def test_a_compiled_model_is_recalibrated_in_place(device):
    model = tiny_resnet().to(device)
    expected = copy.deepcopy(model)
    batches = [torch.randn(4, 1, 8, 8, device=device) + 2 for _ in range(3)]
    reference = reference_statistics(model, batches)
    bnguard.recalibrate(expected, batches, progress=False)
    bnguard.recalibrate(torch.compile(model), batches, progress=False)
    assert_same_tensors(buffers_of(expected), buffers_of(model))
    assert_matches_reference(model, reference)


def test_a_data_parallel_model_is_recalibrated_in_place(monkeypatch):
    # DataParallel as a machine without a GPU builds it, a plain wrapper: where there is one it would move
    # the model to cuda:0 (the GPU lane's test of the compiled model covers CUDA).
    monkeypatch.setattr(sys.modules["torch.nn.parallel.data_parallel"], "_get_available_device_type", lambda: None)
    model = tiny_resnet()
    expected = copy.deepcopy(model)
    batches = [torch.randn(4, 1, 8, 8)]
    bnguard.recalibrate(expected, batches, progress=False)
    bnguard.recalibrate(nn.DataParallel(model), batches, progress=False)
    assert_same_tensors(buffers_of(expected), buffers_of(model))


@ON_EACH_DEVICE
def test_statistics_under_bf16_autocast_are_kept_in_float32_or_better(device):
    model = tiny_resnet().train().to(device)
    batches = [torch.randn(8, 1, 8, 8, device=device) for _ in range(3)]

    def autocast_forward(m, batch):
        with torch.autocast(device, dtype=torch.bfloat16):
            return m(batch)

    captured = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.register_forward_pre_hook(
                lambda module, args, name=name: captured.setdefault(name, []).append(args[0].detach().double()))
    with torch.no_grad():  # the reference: the very (bf16) inputs each layer sees, pooled in float64
        probe = copy.deepcopy(model)
        for batch in batches:
            autocast_forward(probe, batch)
    bnguard.recalibrate(model, batches, forward=autocast_forward, progress=False)
    layers = dict(model.named_modules())
    for name, parts in captured.items():
        if len(parts) < 3:
            continue
        x = torch.cat(parts[:3]).transpose(0, 1).reshape(parts[0].shape[1], -1)
        assert layers[name].running_var.dtype == torch.float32
        torch.testing.assert_close(layers[name].running_var.double(), x.var(dim=1), rtol=1e-5, atol=0)
        torch.testing.assert_close(layers[name].running_mean.double(), x.mean(dim=1), rtol=0, atol=1e-5)


def test_layers_with_a_forward_of_their_own_get_the_same_bits_as_stock_ones():
    stock = tiny_resnet()
    own = with_own_forward(copy.deepcopy(stock))
    batches = [torch.randn(4, 1, 8, 8) + 3 for _ in range(70)]  # past one chunk of 64 rows
    reports = [bnguard.recalibrate(model, batches, progress=False) for model in (stock, own)]
    assert_same_tensors(buffers_of(stock), buffers_of(own))
    assert [layer.error_bound for layer in reports[0].layers] == [layer.error_bound for layer in reports[1].layers]
    assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in own.modules())
    assert all("forward" not in m.__dict__ for m in stock.modules())


def test_a_lazy_layer_materialized_by_load_state_dict_is_recalibrated_like_its_original():
    torch.manual_seed(0)
    original = nn.Sequential(nn.LazyConv2d(3, 3), nn.LazyBatchNorm2d())
    batches = [torch.randn(4, 2, 6, 6) for _ in range(3)]
    original(batches[0])
    loaded = nn.Sequential(nn.LazyConv2d(3, 3), nn.LazyBatchNorm2d())
    loaded.load_state_dict(original.state_dict())
    assert loaded[1].num_features == 0  # what a load leaves: the buffers have shapes, the attribute does not
    bnguard.recalibrate(original, batches, progress=False)
    bnguard.recalibrate(loaded, batches, progress=False)
    for name, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
