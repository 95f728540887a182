import os
import sys
from pathlib import Path

import pytest
import torch

# The tests import their helpers (tests/_support), the examples and the benchmarks by their own names.
ROOT = Path(__file__).resolve().parents[1]
for folder in ("tests/_support", "examples", "benchmarks"):
    sys.path.insert(0, str(ROOT / folder))

# W&B must never try to reach a server from the tests, nor read a user's settings.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# cuBLAS is deterministic only with a fixed workspace, which it reads when it starts (GPU lane only).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
torch.set_num_threads(2)
# Asked once, before any test changes the environment: whether the GPU lane can run here.
CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") and not CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here"))


@pytest.fixture(autouse=True)
def _device(request, monkeypatch):
    """The one place that decides the device. Every test means the CPU, and says so to Accelerate, to the
    command line and to every process they start (ACCELERATE_USE_CPU), except the GPU lane's (marked gpu),
    which run on CUDA with deterministic algorithms (warning, not failing, on an op that has none), so that
    the bits they compare are the bits CUDA gives."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
        yield
        return
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    # Accelerate keeps process-wide singletons; each test builds its own Accelerator from a clean slate.
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _wandb_teardown():
    # W&B keeps a process-wide service and settings; end them so that each test starts its runs afresh.
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
