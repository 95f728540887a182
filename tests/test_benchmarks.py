"""What the benchmarks print about where they ran."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_loop_overhead_table_names_the_device_the_loop_ran_on():
    from accelerate import PartialState

    from loop_overhead import described

    assert described(PartialState(cpu=True).device) == f"CPU, {torch.get_num_threads()} threads"
    assert described(torch.device("mps")) == "mps"
