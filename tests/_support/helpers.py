"""Float64 references and small models shared by the tests."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# The same test on the CPU and, in the GPU lane (python -m pytest -m gpu), on CUDA.
SUPPORT = Path(__file__).resolve().parent  # this folder: helpers, setups, scripts run in their own processes
ROOT = SUPPORT.parents[1]  # the repository
EXAMPLES = ROOT / "examples"


def support_env(**extra: str) -> dict[str, str]:
    """The environment for a test's own process: this folder and the examples importable, as in the tests."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(EXAMPLES)]), **extra}


ON_EACH_DEVICE = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])


def reference_statistics(model: nn.Module, batches, seed: int | None = None, keep_modes: bool = False,
                         only: set[str] | None = None) -> dict:
    """Pooled float64 mean and unbiased variance of every BN layer's input (or of the layers named in
    ``only``), captured by forward pre-hooks on a copy of the model run the way recalibration runs it: those
    BN layers in train mode, every other module in eval mode (or, with keep_modes, as it is)."""
    model = copy.deepcopy(model)
    if not keep_modes:
        model.eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, _BatchNorm) and (only is None or name in only):
            layer.train()

            def capture(module, args, name=name):
                x = args[0].detach().double()
                seen.setdefault(name, []).append(x.movedim(1, 0).reshape(x.shape[1], -1))

            layer.register_forward_pre_hook(capture)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    out = {}
    for name, parts in seen.items():
        values = torch.cat(parts, dim=1)
        out[name] = (values.mean(dim=1), values.var(dim=1, unbiased=True))
    return out


def assert_matches_reference(model: nn.Module, reference: dict, var_rtol: float = 1e-6, mean_tol: float = 1e-6):
    """Variance within var_rtol relative; mean within mean_tol standard deviations plus the rounding of the
    float32 buffer itself (which cannot hold a mean of 100 std to better than ~4e-6 std)."""
    layers = dict(model.named_modules())
    assert reference, "no BatchNorm layer captured"
    for name, (mean, var) in reference.items():
        layer = layers[name]
        rel_var = ((layer.running_var.double() - var).abs() / var).max().item()
        assert rel_var <= var_rtol, f"{name}: relative variance error {rel_var:.3g}"
        ulp = torch.finfo(layer.running_mean.dtype).eps * mean.abs()
        excess = (layer.running_mean.double() - mean).abs() - ulp
        worst = (excess / var.sqrt()).max().item()
        assert worst <= mean_tol, f"{name}: mean error {worst:.3g} std beyond buffer rounding"


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"


class Residual(nn.Module):
    """The seed question's residual block: two 3x3 convs with BN, 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.project = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.project(x))


def tiny_resnet(classes: int = 4, width: int = 4, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        Residual(width, width),
        nn.Dropout(dropout),
        Residual(width, 2 * width, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def resnet18_with_dropout() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.layer2 = nn.Sequential(nn.Dropout(0.3), model.layer2)
    model.layer4 = nn.Sequential(nn.Dropout2d(0.2), model.layer4)
    return model


class OwnForwardBatchNorm(nn.BatchNorm2d):
    """A subclass with a forward of its own, which recalibration feeds through a pre-hook at momentum 1."""

    def forward(self, input):
        return super().forward(input)


def with_own_forward(model):
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = OwnForwardBatchNorm
    return model


def _then_leave_the_group(fn, *args):
    """fn(*args), then the process group is left before the process exits: one that exits still joined can
    abort while gloo's threads are torn down ("terminate called without an active exception")."""
    import torch.distributed as dist

    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch_two_processes(fn, *args):
    """Runs fn(*args) in two real processes joined by gloo through Accelerate (CPU).

    Spawned rather than forked: a fork after torch has used its thread pool can hang the children.
    """
    import socket
    import tempfile

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A folder around the rendezvous file: the processes' file store removes the file once they all left.
    with tempfile.TemporaryDirectory() as rendezvous, patch_environment(
        world_size=2,
        master_addr="127.0.0.1",
        master_port=str(port),
        accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=f"{rendezvous}/store",
        accelerate_use_cpu="yes",
        gloo_socket_ifname="lo",
        omp_num_threads=1,
    ):
        start_processes(PrepareForLaunch(_then_leave_the_group, debug=True), args=(fn, *args), nprocs=2,
                        start_method="spawn")


def toy_data(n: int = 24, classes: int = 4, seed: int = 0, size: int = 8):
    """Images whose class shifts their mean: learnable in a few steps."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.randn(n, 1, size, size, generator=g) + labels.float()[:, None, None, None]
    return TensorDataset(images, labels)


def toy_loop(tmp_path, hooks=(), epochs=2, batch_size=4, n_train=24, n_eval=10, dropout=0.0, **kwargs):
    from torch.utils.data import DataLoader

    import bnguard

    torch.manual_seed(0)
    model = tiny_resnet(dropout=dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = DataLoader(toy_data(n_train), batch_size=batch_size, shuffle=n_train > 0)
    evaluation = DataLoader(toy_data(n_eval, seed=1), batch_size=batch_size) if n_eval else None
    kwargs.setdefault("progress", False)
    return bnguard.Loop(model, optimizer, train, eval_loader=evaluation, hooks=hooks, epochs=epochs,
                        output_dir=tmp_path, **kwargs)


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def without_timings(entries: list[dict]) -> list[dict]:
    """Records or decisions with the wall-clock entries left out: everything else must match."""
    timings = ("seconds", "runtime", "per_second")
    return [{k: v for k, v in entry.items() if not any(t in k for t in timings)} for entry in entries]


def reevaluating_hook():
    """A hook that re-runs evaluation after every evaluation, as a recalibration does."""
    from bnguard import Hook

    class Reevaluate(Hook):
        def on_eval_end(self, state):
            state.evaluate()

    return Reevaluate()


def assert_two_ranks_agree(out, samples: int) -> None:
    """What a 2-process framework run left in ``out`` (rank0.pt, rank1.pt, the W&B folder): bit-identical
    buffers, the same decisions, every recalibration pooling ``samples`` over both ranks, one W&B run."""
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert_same_tensors(rank0["buffers"], rank1["buffers"])
    assert without_timings(rank0["history"]) == without_timings(rank1["history"])
    recalibrated = [r for r in rank0["records"] if r["recalibrated"]]
    assert recalibrated and all(r["recal_samples"] == samples for r in recalibrated)
    assert len(list(out.glob("wandb/offline-run-*"))) == 1
