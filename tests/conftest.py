import os

import pytest
import torch

# W&B must never try to reach a server from the tests, nor read a user's settings.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)


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
