"""recalibrate() leaves nothing else changed: modes, parameters, random streams, and the whole model after an
exception or a Ctrl-C anywhere."""

import copy

import pytest
import torch
from torch import nn

import bnguard
from bnguard.recalibration import storing
from helpers import assert_same_tensors, buffers_of, resnet18_with_dropout, tiny_resnet, with_own_forward


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


def _lines_of(function):
    import inspect

    source, first = inspect.getsourcelines(inspect.unwrap(function))
    return function.__code__ if not hasattr(function, "__wrapped__") else function.__wrapped__.__code__, \
        range(first, first + len(source))


@pytest.mark.parametrize("where", ["bnguard.recalibration.recalibrate._passes",
                                   "bnguard.recalibration.isolation.batchnorm_in_train_mode",
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
