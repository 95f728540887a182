"""Every bad input the command line can meet: its message names the problem and the fix, its exit code is 2,
and nothing is written."""

import re
import sys

import pytest
import torch

import bnguard
from bnguard.cli import BAD_INPUT, main
from cli_setup import ROOT, TINY_RESNET, run_bnguard
from helpers import tiny_resnet

MODEL = TINY_RESNET
TOY_DATA = ("--data", "tests/_support/cli_setup.py:loaders", "--tolerance", "off")


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # specs are read from the repository root, as the README's commands are
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(tiny_resnet().state_dict(), path)
    return path


def fails(capsys, *argv):
    """The command's exit code and its error output, run in this process."""
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([*MODEL, "--model-kwargs", '{"width": 8}'],
     r"does not match the model: 0.weight has shape \[4, 1, 3, 3\] in the checkpoint, the model's 0.weight has "
     r"\[8, 1, 3, 3\]; check --model / --model-kwargs"),
    (["--model", "examples/models.py:SeedNet", "--model-kwargs", '{"num_classes": 4, "width": 4, "in_channels": 1}'],
     "holds none of the model's keys \\(e.g. stem.0.weight\\): check --model / --model-kwargs, or --target averaged"),
    ([*MODEL, "--target", "averaged"],
     r"holds no AveragedModel state \(n_averaged and module.\* keys\)"),
    (["--model", "tests/_support/cli_setup.py:no_batchnorm"], "does not match the model: not in the model: 0.weight, "
     r"1.running_mean, 1.running_var \(and 1 more\); check --model"),
    ([*MODEL, "--model-kwargs", "{width: 8}"], "--model-kwargs is not valid JSON"),
    ([*MODEL, "--model-kwargs", "[8]"], "must be a JSON object"),
    ([*MODEL, "--model-kwargs", '{"depth": 3}'],
     "calling tiny_resnet with {'depth': 3} failed .*unexpected keyword argument 'depth'"),
    (["--model", "torchvision:resnet1800"], "torchvision has no model 'resnet1800'"),
    (["--model", "no_such_package.models:Net"], "cannot import no_such_package.models"),
    (["--model", "tests/_support/helpers.py:TinyNet"], "tests/_support/helpers.py has no TinyNet"),
    (["--model", "resnet18"], "--model resnet18: give torchvision's model as --model torchvision:resnet18"),
    (["--model", "mynet"], "expected package.module:name or path/to/file.py:name"),
    ([*MODEL, "--data", "tests", "--out", "x.pt"], "--data tests: give a folder of images as --data imagefolder:tests"),
    ([], "which network does .* hold\\? give it with --model torchvision:NAME"),
    ([*MODEL, "--data", "tests/_support/cli_setup.py:loaders", "--data-kwargs", '{"channels": 3}', "--out", "x.pt"],
     r"the model refused the data: a batch of inputs \[8, 3, 8, 8\], \[8\] gave RuntimeError: .*; check --data, "
     "--image-size and the model's input channels"),
    ([*MODEL, "--data", "tests/_support/cli_setup.py:no_batchnorm", "--out", "x.pt"], "must return \\(train_loader, "
     "eval_loader\\) or a dict with 'train' and 'eval' loaders, got Sequential"),
    ([*MODEL, "--data", "imagefolder:/no/such/folder", "--out", "x.pt"], "/no/such/folder does not exist"),
    ([*MODEL, "--data", "tests/_support/cli_setup.py:loaders", "--data-kwargs", '{"n_train": 0}', "--out", "x.pt"],
     "--data tests/_support/cli_setup.py:loaders: batches is empty: recalibration needs at least one batch"),
    ([*MODEL, "--data", "tests/_support/cli_setup.py:loaders", "--data-kwargs", '{"n_eval": 0}', "--out", "x.pt"],
     "the eval split is empty"),
    ([*MODEL, *TOY_DATA, "--device", "gpu", "--out", "x.pt"], "--device 'gpu' is not a device"),
])
def test_bad_input_is_named_with_exit_code_2_and_nothing_written(saved, capsys, argv, message):
    command = "recalibrate" if "--out" in argv else "inspect"
    argv = [a if a != "x.pt" else str(saved.with_name("x.pt")) for a in argv]
    code, err = fails(capsys, command, saved, *argv)
    assert code == BAD_INPUT, err
    assert len(re.findall(message, err)) == 1, err
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("out, message", [
    ("model.pt", "is the checkpoint itself or inside it: bnguard never overwrites its input"),
    ("other.pt", "--out .*other.pt exists: bnguard does not replace files"),
    ("repaired.safetensors", r"the checkpoint is written back in its own format, name it \*.pt"),
    ("missing/repaired.pt", "folder .*missing does not exist"),
    ("/sys/repaired.pt", r"--out /sys/repaired.pt: folder /sys cannot be written to \(.*\); give a path in a folder"),
])
def test_an_output_that_would_replace_something_is_refused(saved, capsys, out, message):
    saved.with_name("other.pt").write_bytes(b"the user's own file")
    code, err = fails(capsys, "recalibrate", saved, *MODEL, *TOY_DATA, "--out", saved.parent / out)
    assert code == BAD_INPUT and re.search(message, err), err
    assert saved.with_name("other.pt").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.pt", "other.pt"]


def test_checkpoints_that_cannot_be_read_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "notes.txt").write_text("hello world")
    (tmp_path / "nothing.pt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    cases = {tmp_path / "absent.pt": "absent.pt does not exist",
             tmp_path / "notes.pt": r"notes.pt is not a PyTorch or safetensors file \(not written by torch.save\)",
             tmp_path / "notes.txt": r"notes.txt is not a PyTorch or safetensors file \(KeyError: .*\): give a file "
                                     "written by torch.save or safetensors",
             tmp_path / "nothing.pt": r"nothing.pt is an empty file \(0 bytes\)",
             tmp_path / "broken.safetensors": "broken.safetensors is not a readable safetensors file",
             tmp_path / "empty": "is a folder but neither a bnguard Loop checkpoint .* nor a Hugging Face model folder"}
    for path, message in cases.items():
        code, err = fails(capsys, "inspect", path, *MODEL)
        assert code == BAD_INPUT and re.search(message, err), err


def test_a_pickle_of_objects_is_refused_not_unpickled(saved, capsys):
    torch.save(tiny_resnet(), saved)  # the whole module, pickled: loading it would run code from the file
    code, err = fails(capsys, "inspect", saved, *MODEL)
    assert code == BAD_INPUT and "save model.state_dict() instead" in err
    assert "holds Python objects (torch.nn.modules.container.Sequential) besides tensors" in err


def test_a_model_without_batchnorm_is_refused(saved, capsys):
    from cli_setup import no_batchnorm

    torch.save(no_batchnorm().state_dict(), saved)
    code, err = fails(capsys, "recalibrate", saved, "--model", "tests/_support/cli_setup.py:no_batchnorm", *TOY_DATA,
                      "--out", saved.with_name("x.pt"))
    assert code == BAD_INPUT and "Sequential has no BatchNorm layer with running statistics: there is nothing" in err


def test_a_loop_checkpoint_changed_since_it_was_written_is_refused(tmp_path, capsys, monkeypatch):
    from helpers import toy_loop

    monkeypatch.chdir(ROOT)
    toy_loop(tmp_path, epochs=1, checkpoint_every_epochs=1).fit()
    folder = tmp_path / "checkpoints" / "epoch-0001"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    code, err = fails(capsys, "recalibrate", folder, *MODEL, *TOY_DATA, "--out", tmp_path / "repaired")
    assert code == BAD_INPUT and "model.safetensors has" in err and "truncated or overwritten" in err, err
    assert not (tmp_path / "repaired").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tolerance", "2"], "argument --tolerance: expected a number in (0, 1] or off, got '2'"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer of 1 or more, got '0'"),
    (["--normalize", "0.5:0"], "argument --normalize: expected none, imagenet, or means:stds"),
    (["--target", "ema"], "argument --target: invalid choice: 'ema'"),
])
def test_bad_options_are_argparse_errors(saved, capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(["recalibrate", str(saved), *MODEL, "--out", str(saved.with_name("x.pt")), *argv])
    assert exited.value.code == BAD_INPUT and message in capsys.readouterr().err


def test_the_exit_codes_reach_a_shell_script(saved):
    missing = run_bnguard("inspect", saved.with_name("absent.pt"), *MODEL)
    assert missing.returncode == 2 and "bnguard inspect: checkpoint" in missing.stderr
    no_out = run_bnguard("recalibrate", saved, *MODEL)
    assert no_out.returncode == 2 and "the following arguments are required: --data, --out" in no_out.stderr
    no_data = run_bnguard("recalibrate", saved, *MODEL, "--out", saved.with_name("x.pt"))
    assert no_data.returncode == 2 and "the following arguments are required: --data" in no_data.stderr
    assert re.search(r"(?<!\[)--data SPEC", run_bnguard("recalibrate", "--help").stdout)  # not in [brackets]


def test_help_explains_the_forms_with_examples():
    for launcher in (None, ("bnguard",)):
        shown = run_bnguard("recalibrate", "--help", **({"launcher": launcher} if launcher else {}))
        assert shown.returncode == 0, shown.stderr
        assert "torchrun --nproc_per_node 2 -m bnguard recalibrate" in shown.stdout
        assert "3 not written" in shown.stdout and "--target {model,averaged}" in shown.stdout


@pytest.mark.parametrize("report, message", [
    ("model.pt", "--report .*model.pt is the checkpoint itself or inside it"),
    ("missing/report.json", "--report .*report.json: folder .*missing does not exist"),
    ("/sys/report.json", "--report /sys/report.json: folder /sys cannot be written to"),
])
def test_a_report_that_would_replace_the_input_or_go_nowhere_is_refused_first(saved, capsys, report, message):
    before = saved.read_bytes()
    code, err = fails(capsys, "inspect", saved, *MODEL, *TOY_DATA, "--report", saved.parent / report)
    assert code == BAD_INPUT and re.search(message, err), err
    assert saved.read_bytes() == before and sorted(p.name for p in saved.parent.iterdir()) == ["model.pt"]


def test_help_and_version_answer_without_importing_torch():
    probe = ("import runpy, sys\nsys.argv = ['bnguard'] + sys.argv[1:]\ntry:\n"
             "    runpy.run_module('bnguard', run_name='__main__')\nexcept SystemExit as exit:\n"
             "    print('exit', exit.code, sorted({'torch', 'accelerate', 'numpy'} & set(sys.modules)))")
    for argv in (["--help"], ["recalibrate", "--help"], ["--version"], ["recalibrate", "x.pt"]):
        shown = run_bnguard("-c", probe, *argv, launcher=(sys.executable,))
        assert shown.stdout.strip().endswith("[]"), (argv, shown.stdout, shown.stderr)
    version = run_bnguard("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"bnguard {bnguard.__version__}"
