import copy
import sys

import pytest
import torch
import torchvision
from torch import nn

import bnguard
from bnguard.recalibration import storing
from helpers import (
    ON_EACH_DEVICE,
    assert_matches_reference,
    assert_same_tensors,
    buffers_of,
    reference_statistics,
    tiny_resnet,
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
    torch.testing.assert_close(bn.running_var.double(), torch.full((3,), m * (m + 1) / 12, dtype=torch.float64), rtol=1e-7, atol=0)
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


def resnet18_with_dropout() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.layer2 = nn.Sequential(nn.Dropout(0.3), model.layer2)
    model.layer4 = nn.Sequential(nn.Dropout2d(0.2), model.layer4)
    return model


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


def test_state_is_restored_and_parameters_untouched():
    model = resnet18_with_dropout()
    model.eval()
    model.layer1.train()  # a mixed state, to be restored exactly
    model.bn1.momentum = None
    model.fc(torch.randn(2, 512)).sum().backward()
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.step()
    modes = {name: m.training for name, m in model.named_modules()}
    momenta = {name: m.momentum for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    opt_state = copy.deepcopy(optimizer.state_dict())
    calls = []
    model.layer1[0].bn1.register_forward_hook(lambda *a: calls.append(1))
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    rng = torch.get_rng_state()

    bnguard.recalibrate(model, batches, progress=False)

    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: m.momentum for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)} == momenta
    assert {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()} == hooks
    assert len(calls) == 2  # the user's hook still ran during the passes
    assert_same_tensors(params, {name: p.detach() for name, p in model.named_parameters()})
    assert_same_tensors(grads, {name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    after = optimizer.state_dict()
    for key, state in opt_state["state"].items():
        assert_same_tensors({k: v for k, v in state.items()}, dict(after["state"][key]))


def test_same_random_stream_afterwards():
    model = tiny_resnet(dropout=0.5).train()
    batches = [torch.randn(4, 1, 8, 8)]
    torch.manual_seed(11)
    bnguard.recalibrate(model, batches, progress=False)
    with_recal = torch.rand(5)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(5), with_recal)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["loader", "forward"])
def test_exception_mid_iteration_leaves_buffers_bit_identical(error, where):
    model = tiny_resnet()
    with torch.no_grad():  # give the buffers non-trivial content first
        model.train()(torch.randn(8, 1, 8, 8) * 3)
    model.eval()
    before = buffers_of(model)

    def batches():
        yield torch.randn(4, 1, 8, 8)
        yield torch.randn(4, 1, 8, 8)
        if where == "loader":
            raise error("loader died")
        yield torch.randn(4, 1, 8, 8)

    seen = []

    def forward(m, batch):
        seen.append(1)
        if where == "forward" and len(seen) == 3:
            raise error("forward died")
        return m(batch)

    with pytest.raises(error):
        bnguard.recalibrate(model, batches(), forward=forward, progress=False)
    assert_same_tensors(before, buffers_of(model))
    assert all(not m.training for m in model.modules())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


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


def test_layers_of_different_dtypes_and_call_counts_pool_exactly_past_a_chunk():
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
    batches = [torch.randn(3, 3) * 4 + 1 for _ in range(70)]  # 140 calls of the second layer: several chunks
    reference = reference_statistics(model, batches)
    report = bnguard.recalibrate(model, batches, progress=False)
    assert model.second.running_var.dtype == torch.float64
    assert_matches_reference(model, reference)
    mean, var = reference["second"]
    torch.testing.assert_close(model.second.running_mean, mean, rtol=0, atol=1e-12)  # float64 all the way
    torch.testing.assert_close(model.second.running_var, var, rtol=1e-12, atol=0)
    assert [layer.batches for layer in report.layers] == [70, 140]
    assert model.second.num_batches_tracked.item() == 140


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


def _interrupt_on_call(monkeypatch, owner, name, nth=1):
    """Makes the nth call of owner.name deliver a real Ctrl-C (SIGINT) to this process, then carry on."""
    import signal

    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == nth:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(owner, name, interrupted)
    return calls


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the test process was started with: a
    background or nohup run starts with SIGINT ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class OwnForwardBatchNorm(nn.BatchNorm2d):
    """A subclass with a forward of its own, which recalibration feeds through a pre-hook at momentum 1."""

    def forward(self, input):
        return super().forward(input)


def with_own_forward(model):
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = OwnForwardBatchNorm
    return model


def test_layers_with_a_forward_of_their_own_get_the_same_bits_as_stock_ones():
    stock = tiny_resnet()
    own = with_own_forward(copy.deepcopy(stock))
    batches = [torch.randn(4, 1, 8, 8) + 3 for _ in range(70)]  # past one chunk of 64 rows
    reports = [bnguard.recalibrate(model, batches, progress=False) for model in (stock, own)]
    assert_same_tensors(buffers_of(stock), buffers_of(own))
    assert [layer.error_bound for layer in reports[0].layers] == [layer.error_bound for layer in reports[1].layers]
    assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in own.modules())
    assert all("forward" not in m.__dict__ for m in stock.modules())


def test_ctrl_c_during_the_cleanup_of_the_passes_still_restores_every_layer(monkeypatch, ctrl_c_raises):
    model = with_own_forward(tiny_resnet()).train()
    before = buffers_of(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    calls = _interrupt_on_call(monkeypatch, torch.utils.hooks.RemovableHandle, "remove")
    with pytest.raises(KeyboardInterrupt):
        bnguard.recalibrate(model, [torch.randn(4, 1, 8, 8)], progress=False)
    assert len(calls) == 6  # every pre-hook was removed although the interrupt came at the first
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.momentum for m in layers] == momenta
    assert all(not m._forward_pre_hooks and not m._forward_hooks and "forward" not in m.__dict__ for m in layers)
    assert all(m.training for m in model.modules())
    assert_same_tensors(before, buffers_of(model))


def test_ctrl_c_while_writing_the_statistics_writes_all_layers_or_none(monkeypatch, ctrl_c_raises):
    model = tiny_resnet()
    batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    expected = copy.deepcopy(model)
    bnguard.recalibrate(expected, batches, progress=False)
    _interrupt_on_call(monkeypatch, storing, "_copy_all", nth=1)  # means written, not variances
    with pytest.raises(KeyboardInterrupt):
        bnguard.recalibrate(model, batches, progress=False)
    assert_same_tensors(buffers_of(expected), buffers_of(model))  # all six layers new


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


def _lines_of(function):
    import inspect

    source, first = inspect.getsourcelines(inspect.unwrap(function))
    return function.__code__ if not hasattr(function, "__wrapped__") else function.__wrapped__.__code__, \
        range(first, first + len(source))


@pytest.mark.parametrize("where", ["bnguard.recalibration.recalibrate._passes", "bnguard.recalibration.isolation.batchnorm_in_train_mode",
                                   "bnguard.recalibration.isolation.interrupts_deferred"])
def test_a_ctrl_c_on_any_line_of_the_passes_setup_or_cleanup_leaves_the_model_as_it_was(where, ctrl_c_raises):
    import importlib
    import signal
    import sys

    module, name = where.rsplit(".", 1)
    code, lines = _lines_of(getattr(importlib.import_module(module), name))
    model = tiny_resnet().train()
    batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    before, expected = buffers_of(model), copy.deepcopy(model)
    bnguard.recalibrate(expected, batches, progress=False)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in layers]
    interrupted_at = []
    for line in lines:
        fired = []

        def tracer(frame, event, arg, line=line):
            if frame.f_code is not code:
                return None

            def on_line(frame, event, arg):
                if event == "line" and frame.f_lineno == line and not fired:
                    fired.append(line)
                    signal.raise_signal(signal.SIGINT)
                return on_line
            return on_line

        rng = torch.get_rng_state()
        sys.settrace(tracer)
        try:
            bnguard.recalibrate(model, batches, progress=False)
        except KeyboardInterrupt:
            interrupted_at.append(line)
            assert_same_tensors(before, buffers_of(model))  # interrupted: nothing written
        else:
            assert_same_tensors(buffers_of(expected), buffers_of(model))
        finally:
            sys.settrace(None)
        assert [m.momentum for m in layers] == momenta, f"Ctrl-C at line {line}"
        assert all(not m._forward_pre_hooks and "forward" not in vars(m) for m in layers), f"line {line}"
        assert all(m.training for m in model.modules()), f"Ctrl-C at line {line}"
        assert torch.equal(torch.get_rng_state(), rng) and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        for name_, buffer in before.items():  # the next round starts from the old statistics again
            model.get_buffer(name_).copy_(buffer)
    assert interrupted_at  # the signals did land


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
