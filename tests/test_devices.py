"""Where the suite means the CPU, every entry point runs there, whether or not the machine has a GPU."""

import os

import pytest
import torch

from bnguard.cli.processes import default_device


@pytest.mark.parametrize("gpu", [True, False])
def test_the_command_lines_default_device_follows_accelerate_use_cpu(monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert os.environ["ACCELERATE_USE_CPU"] == "1"  # the suite's own setting (tests/conftest.py)
    assert default_device() == "cpu"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert default_device() == ("cuda" if gpu else "cpu")
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert default_device() == ("cuda" if gpu else "cpu")


def test_accelerate_runs_the_suites_loops_on_the_cpu_as_if_there_were_a_gpu(tmp_path, monkeypatch):
    from helpers import toy_loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # without the setting: "no NVIDIA driver"
    assert toy_loop(tmp_path).accelerator.device == torch.device("cpu")
