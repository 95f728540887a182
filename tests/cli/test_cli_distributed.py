"""``torchrun --nproc_per_node 2 -m bnguard recalibrate``: two real gloo processes, each recalibrating on every
second batch, merged exactly as the library merges them."""

import json
import sys
from pathlib import Path

import torch

import bnguard
from cli_setup import TINY_RESNET, TOY_DATA, loaders, run_bnguard, trained
from helpers import buffers_of, parameters_of, tiny_resnet


def test_two_processes_merge_to_the_statistics_of_all_their_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.manual_seed(0)
    model = trained(tiny_resnet())
    source, out = tmp_path / "model.pt", tmp_path / "repaired.pt"
    torch.save(model.state_dict(), source)
    torchrun = (str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                "-m", "bnguard")
    done = run_bnguard("recalibrate", source, *TINY_RESNET, *TOY_DATA, "--device", "cpu", "--out", out, "--force",
                       launcher=torchrun)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("with the stored statistics") == 1  # the main process speaks for both
    report = json.loads(out.with_name("repaired.pt.report.json").read_text())
    assert report["processes"] == 2 and report["recalibration"]["samples"] == 48
    assert report["before"]["samples"] == 24  # every eval sample once, over both processes
    single = tiny_resnet()
    single.load_state_dict(model.state_dict())
    bnguard.recalibrate(single, list(loaders()[0]), progress=False)  # all six batches in one process
    repaired = tiny_resnet()
    repaired.load_state_dict(torch.load(out, weights_only=True))
    for name, value in buffers_of(single).items():
        torch.testing.assert_close(buffers_of(repaired)[name], value, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(parameters_of(repaired)[k], v) for k, v in parameters_of(model).items())
