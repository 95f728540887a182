"""examples/train.py end to end on a few batches: outputs, the W&B run, two processes, bad data folders."""

import json
import re
import urllib.error
from pathlib import Path

import pytest
from torch import nn

from helpers import launch_two_processes  # noqa: E402
from wandb_log import history, offline_run_dir  # noqa: E402

SEEDNET_BN = ["stem.1"] + [f"blocks.{b}.bn{i}" for b in range(8) for i in (1, 2)]
QUICK = ["--epochs", "2", "--limit-batches", "3"]


def test_the_network_has_the_questions_17_batchnorm_layers():
    from models import SeedNet

    names = [n for n, m in SeedNet(10).named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert names == SEEDNET_BN


def check_outputs(out: Path, steps=(3, 6)):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == list(steps)
    assert all(0 <= r["eval_acc"] <= 1 and "recalibrated" in r and "diagnosis" in r for r in records)
    rows = history(offline_run_dir(out))
    for name in SEEDNET_BN:
        for stat in ("running_mean", "running_var"):
            logged = {r["_step"]: r for r in rows if r.get(f"bn/{name}/{stat}/_type") == "histogram"}
            assert set(steps) <= set(logged), f"{name} {stat}: {sorted(logged)}"
            channels = 16 * 2 ** (int(name.split(".")[1]) // 2) if name != "stem.1" else 16
            assert all(sum(r[f"bn/{name}/{stat}/values"]) == channels for r in logged.values())
    return records


def test_default_run_on_a_few_batches(tmp_path, capsys):
    from train import main

    main([*QUICK, "--output-dir", str(tmp_path)])
    check_outputs(tmp_path)
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    out = capsys.readouterr().out
    assert "wandb sync" in out and "[auto] best eval accuracy" in out
    assert (tmp_path / "checkpoints" / "epoch-0002").is_dir()


def test_compare_runs_both_from_the_same_seed(tmp_path):
    from train import main

    results = main([*QUICK, "--compare", "--tracker", "none", "--output-dir", str(tmp_path)])
    off, auto = results["off"]["records"], results["auto"]["records"]
    assert [r["train_acc"] for r in off] == [r["train_acc"] for r in auto]  # same weights throughout
    assert (tmp_path / "off" / "metrics.jsonl").exists() and (tmp_path / "auto" / "metrics.jsonl").exists()
    assert (tmp_path / "accuracy.png").exists()


def _run_example(argv):
    from train import main

    main(argv)


def test_two_processes(tmp_path):
    launch_two_processes(_run_example, [*QUICK, "--batch-size", "16", "--output-dir", str(tmp_path)])
    check_outputs(tmp_path)  # one metrics file, one W&B run: written by the main process only


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_missing_data_directory_is_named(tmp_path, dataset):
    from train import main

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"--data-dir {missing} does not exist"):
        main(["--dataset", dataset, "--data-dir", str(missing), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_cifar10_that_cannot_be_downloaded_says_which_file_to_put_where(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    from train import main

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=f"put cifar-10-python.tar.gz .* in {tmp_path} and run again"):
        main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])


def test_empty_image_folder_is_named(tmp_path):
    from train import main

    (tmp_path / "leaves").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no class folders"):
        main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "leaves"), "--output-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("argv, message", [(["--limit-batches", "0"], "--limit-batches must be positive, got 0"),
                                           (["--bn-momentum", "-1"], r"--bn-momentum must be in \[0, 1\]"),
                                           (["--bn-momentum", "5"], r"--bn-momentum must be in \[0, 1\]"),
                                           (["--lr", "0"], "--lr must be positive"),
                                           (["--num-workers", "-2"], "--num-workers must be 0 or more")])
def test_bad_settings_are_argparse_errors(argv, message, capsys):
    from train import parse_args

    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_resume_latest_without_an_output_dir_takes_the_newest_run_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    from train import parse_args

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(["--resume", "latest"])
    assert "found no run with a checkpoint under runs/: pass the run's --output-dir" in capsys.readouterr().err
    for run, epoch in (("20261201-090000", 4), ("20261202-090000", 2)):
        (tmp_path / "runs" / run / "checkpoints" / f"epoch-{epoch:04d}").mkdir(parents=True)
    (tmp_path / "runs" / "20261203-090000").mkdir()  # a run that never checkpointed
    assert parse_args(["--resume", "latest"]).output_dir == str(Path("runs") / "20261202-090000")
    assert "resuming the newest run, runs/20261202-090000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--resume", "latest", "--output-dir", "runs/20261203-090000"])
    assert "runs/20261203-090000 holds no checkpoint" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    argv = ["--epochs", "2", "--output-dir", str(tmp_path), "--bnguard", "always"]
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == 130
    assert "interrupted before the first checkpoint (one every --checkpoint-every 4 epochs)" in capsys.readouterr().out
    (tmp_path / "checkpoints" / "epoch-0004").mkdir(parents=True)
    with pytest.raises(SystemExit):
        train.main(argv)
    assert (f"accelerate launch examples/train.py --epochs 2 --bnguard always --resume latest --output-dir "
            f"{tmp_path}") in capsys.readouterr().out
