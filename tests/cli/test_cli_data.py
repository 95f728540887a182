"""The data sets the command line knows: the example's digits split, batched and shuffled by ``--seed``, and an
image folder with the example's transforms."""

import json

import pytest
import torch

import bnguard
from bnguard.cli import main
from bnguard.cli.datasets import digits
from cli_setup import ROOT, TOY_DATA
from helpers import buffers_of

SEEDNET = ("--model", "examples/models.py:SeedNet", "--model-kwargs",
           '{"num_classes": 10, "width": 4, "in_channels": %d}')


def seednet(channels):
    from models import SeedNet
    torch.manual_seed(0)
    return SeedNet(10, width=4, in_channels=channels)


def test_digits_are_the_examples_split_and_batches_drawn_by_the_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    model = seednet(1)
    source, out = tmp_path / "seednet.pt", tmp_path / "repaired.pt"
    torch.save(model.state_dict(), source)
    model_option = [*SEEDNET[:3], SEEDNET[3] % 1]
    code = main(["recalibrate", str(source), *model_option, "--data", "digits", "--image-size", "8", "--seed", "5",
                 "--tolerance", "off", "--samples", "64", "--out", str(out), "--force"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "repaired.pt.report.json").read_text())
    assert report["before"]["samples"] == 450 and report["recalibration"]["samples"] == 64
    train, _, _, _ = digits(8, seed=5)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(5))
    expected = seednet(1)
    expected.load_state_dict(model.state_dict())
    bnguard.recalibrate(expected, [train[order[:32]], train[order[32:64]]], progress=False)
    repaired = seednet(1)
    repaired.load_state_dict(torch.load(out, weights_only=True))
    for name, value in buffers_of(expected).items():
        torch.testing.assert_close(buffers_of(repaired)[name], value, rtol=1e-6, atol=1e-7)


def test_an_image_folder_is_split_and_normalized_as_asked(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(ROOT)
    generator = torch.Generator().manual_seed(0)
    for label in ("oak", "elm"):
        (tmp_path / "leaves" / label).mkdir(parents=True)
        for index in range(5):
            pixels = torch.randint(0, 256, (12, 12, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "leaves" / label / f"{index}.png")
    source = tmp_path / "seednet.pt"
    torch.save(seednet(3).state_dict(), source)
    report = tmp_path / "inspect.json"
    code = main(["inspect", str(source), *SEEDNET[:3], SEEDNET[3] % 3, "--data", f"imagefolder:{tmp_path / 'leaves'}",
                 "--image-size", "8", "--normalize", "imagenet", "--tolerance", "off", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    findings = json.loads(report.read_text())
    assert findings["before"]["samples"] == 2 and findings["recalibration"]["samples"] == 8  # 10 images, 20% eval
    assert "imagefolder" in findings["data"] and "written" not in findings


@pytest.mark.parametrize("normalize", ["0.5,0.5:0.2", "a:b", "0.5:-1"])
def test_a_normalization_that_is_not_per_channel_numbers_is_refused(normalize):
    from bnguard.cli.forms import normalization

    with pytest.raises(ValueError, match="expected none, imagenet, or means:stds"):
        normalization(normalize)


def test_inspects_json_report_holds_each_layers_stored_statistics(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    model = seednet(1)
    with torch.no_grad():
        model.stem[1].running_mean.copy_(torch.arange(4.0))
        model.stem[1].running_var.copy_(torch.tensor([1.0, 2.0, 0.5, 4.5]))
    source, report = tmp_path / "seednet.pt", tmp_path / "inspect.json"
    torch.save(model.state_dict(), source)
    assert main(["inspect", str(source), *SEEDNET[:3], SEEDNET[3] % 1, "--report", str(report)]) == 0
    stem = json.loads(report.read_text())["statistics"][0]
    assert stem == {"layer": "stem.1", "channels": 4, "mean_of_mean": 1.5, "mean_of_var": 2.0, "min_var": 0.5,
                    "batches_tracked": 0}
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("stem.1 ")]
    assert printed == [["stem.1", "4", "1.5", "2", "0.5", "0"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect.json", "seednet.pt"]


def test_a_model_file_with_its_own_dataclass_and_lazy_layers_is_loaded(tmp_path, monkeypatch, capsys):
    from cli_setup import lazy_net, loaders

    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    model = lazy_net()
    model(next(iter(loaders()[0]))[0])  # materialized, statistics tracked once
    source, report = tmp_path / "lazy.pt", tmp_path / "inspect.json"
    torch.save(model.state_dict(), source)
    lazy = ("--model", "tests/_support/cli_setup.py:lazy_net")
    assert main(["inspect", str(source), *lazy, "--report", str(report)]) == 0
    layer = json.loads(report.read_text())["statistics"][0]
    assert layer["channels"] == 4 and layer["batches_tracked"] == 1
    assert layer["mean_of_var"] == pytest.approx(model[1].running_var.double().mean().item(), rel=1e-12)
    out = tmp_path / "repaired.pt"
    assert main(["recalibrate", str(source), *lazy, *TOY_DATA, "--out", str(out), "--force"]) == 0
    assert torch.load(out, weights_only=True)["1.num_batches_tracked"] == 6  # six batches pooled
