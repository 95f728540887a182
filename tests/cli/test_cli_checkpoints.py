"""``bnguard recalibrate`` on each kind of saved model, run as a user would: the checkpoint saved by its own
framework, repaired by the command in its own process, loaded back by the framework, and its statistics
those ``bnguard.recalibrate`` computes on the same batches."""

import pytest
import torch

from bnguard.utils.manifest import verify_checkpoint
from cli_setup import TINY_RESNET, TOY_DATA, assert_repaired, dict_loaders, loaders, report_of, run_bnguard, trained
from helpers import ON_EACH_DEVICE, tiny_resnet, toy_loop


@ON_EACH_DEVICE
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_state_dict_file_is_repaired_in_its_own_format(tmp_path, suffix, device):
    torch.manual_seed(0)
    model = trained(tiny_resnet())
    source, out = tmp_path / f"model{suffix}", tmp_path / f"repaired{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), source)
    else:
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(source), metadata={"format": "pt"})
    done = run_bnguard("recalibrate", source, *TINY_RESNET, *TOY_DATA, "--out", out,
                       "--force", "--device", device)
    assert done.returncode == 0, done.stderr
    if suffix == ".pt":
        state = torch.load(out, weights_only=True)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file
        state = load_file(str(out))
        with safe_open(str(out), "pt") as opened:
            assert opened.metadata() == {"format": "pt"}
    loaded = tiny_resnet()
    loaded.load_state_dict(state)
    assert_repaired(loaded, model, loaders()[0], device)
    report = report_of(out)
    assert report["written"] and report["kind"] == "state dict" and report["recalibration"]["samples"] == 48
    assert report["before"]["samples"] == report["after"]["samples"] == 24


def test_a_loop_checkpoint_is_repaired_verified_and_resumed_by_the_loop(tmp_path):
    toy_loop(tmp_path / "run", epochs=2, checkpoint_every_epochs=1).fit()
    source, out = tmp_path / "run" / "checkpoints" / "epoch-0002", tmp_path / "repaired"
    original = tiny_resnet()
    original.load_state_dict(load_safetensors(source / "model.safetensors"))
    done = run_bnguard("recalibrate", source, *TINY_RESNET, *TOY_DATA, "--out", out,
                       "--force")
    assert done.returncode == 0, done.stderr
    verify_checkpoint(out)  # the manifest was rewritten for the new model file
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    for name in ("optimizer.bin", "random_states_0.pkl", "records.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    loop = toy_loop(tmp_path / "run", epochs=2)
    loop.fit(resume_from=out)  # both epochs done: loads the checkpoint, trains no further
    assert_repaired(loop.model, original, loaders()[0])


def load_safetensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.mark.parametrize("model_spec, keys", [
    (["--model", "tests/_support/lightning_setup.py:Classifier"], "(no prefix)*"),
    (["--model", "examples/models.py:SeedNet", "--model-kwargs", '{"num_classes": 4, "width": 4, "in_channels": 1}'],
     "net.*"),
], ids=["lightning-module", "inner-network"])
def test_a_lightning_checkpoint_is_repaired_and_loads_back_in_lightning(tmp_path, model_spec, keys):
    import lightning.pytorch as pl

    from lightning_setup import Classifier

    torch.manual_seed(0)
    module = Classifier(width=4)
    train, evaluation = loaders(size=16)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train, evaluation)
    source, out = tmp_path / "last.ckpt", tmp_path / "repaired.ckpt"
    trainer.save_checkpoint(source)
    done = run_bnguard("recalibrate", source, *model_spec, "--data", "tests/_support/cli_setup.py:loaders",
                       "--data-kwargs", '{"size": 16}', "--tolerance", "off", "--out", out, "--force")
    assert done.returncode == 0, done.stderr
    loaded = Classifier.load_from_checkpoint(out, width=4)
    assert_repaired(loaded, module, loaders(size=16)[0])
    before, after = torch.load(source, weights_only=True), torch.load(out, weights_only=True)
    assert before.keys() == after.keys()
    torch.testing.assert_close(after["optimizer_states"], before["optimizer_states"], rtol=0, atol=0)
    assert report_of(out)["location"] == f"last.ckpt['state_dict'], keys {keys}"


@pytest.mark.parametrize("model_option", [[], ["--model", "transformers:ResNetForImageClassification"]],
                         ids=["from-config", "class-given"])
def test_a_hugging_face_folder_is_repaired_and_loads_with_from_pretrained(tmp_path, model_option):
    import transformers

    from hf_setup import tiny_resnet as hf_resnet

    model = hf_resnet()
    model.train()
    with torch.no_grad():
        for batch in dict_loaders()["train"]:
            model(**batch)  # statistics tracked by momentum, as training would leave them
    source, out = tmp_path / "model", tmp_path / "repaired"
    model.save_pretrained(source)
    done = run_bnguard("recalibrate", source, *model_option, "--data", "tests/_support/cli_setup.py:dict_loaders",
                       "--tolerance", "off", "--out", out, "--force")
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    loaded = transformers.ResNetForImageClassification.from_pretrained(out)
    assert_repaired(loaded, model, dict_loaders()["train"])
    assert report_of(out)["kind"] == "Hugging Face folder"


def test_a_repair_that_lowers_eval_accuracy_is_not_written(tmp_path):
    torch.manual_seed(0)
    model = trained(tiny_resnet())
    source, out = tmp_path / "model.pt", tmp_path / "repaired.pt"
    torch.save(model.state_dict(), source)
    unlike_eval = ("--data-kwargs", '{"train_scale": 4.0, "train_shift": 3.0}')
    done = run_bnguard("recalibrate", source, *TINY_RESNET, *TOY_DATA, *unlike_eval,
                       "--out", out)
    assert done.returncode == 3, done.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    report = report_of(out)
    assert not report["written"] and report["after"]["accuracy"] < report["before"]["accuracy"]
    assert "not written" in done.stdout and "--force" in done.stdout
    forced = run_bnguard("recalibrate", source, *TINY_RESNET, *TOY_DATA, *unlike_eval,
                         "--out", out, "--force")
    assert forced.returncode == 0 and out.exists() and report_of(out)["written"]


def test_inspect_shows_the_statistics_and_writes_nothing(tmp_path):
    torch.manual_seed(0)
    model = trained(tiny_resnet())
    source = tmp_path / "model.pt"
    torch.save(model.state_dict(), source)
    done = run_bnguard("inspect", source, *TINY_RESNET, *TOY_DATA)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    layer = model[1]  # the first BatchNorm layer, named "1", with 4 channels
    first = [line.split() for line in done.stdout.splitlines() if line.split()[:2] == ["1", "4"]][0]
    assert float(first[2]) == pytest.approx(layer.running_mean.double().mean().item(), rel=1e-3, abs=1e-4)
    assert float(first[3]) == pytest.approx(layer.running_var.double().mean().item(), rel=1e-3)
    assert int(first[5]) == int(layer.num_batches_tracked)
    assert "with the stored statistics" in done.stdout and "with the recalibrated statistics" in done.stdout


def test_data_unlike_training_are_said_and_not_written(tmp_path):
    torch.manual_seed(0)
    source, out = tmp_path / "model.pt", tmp_path / "repaired.pt"
    torch.save(trained(tiny_resnet()).state_dict(), source)
    unlike = ("--data-kwargs", '{"random_labels": true, "n_eval": 400}')
    done = run_bnguard("recalibrate", source, *TINY_RESNET, *TOY_DATA, *unlike,
                       "--out", out)
    assert done.returncode == 4, done.stderr
    assert "the data look unlike the training data: the model scores at chance (25% for 4 classes)" in done.stdout
    assert "not written: the data probably do not match training (check --data, --image-size" in done.stdout
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    report = report_of(out)
    assert not report["written"] and report["unlike_training"].startswith("the model scores at chance")
    assert max(report["before"]["accuracy"], report["after"]["accuracy"]) <= 0.375
    forced = run_bnguard("recalibrate", source, *TINY_RESNET, *TOY_DATA, *unlike,
                         "--out", out, "--force")
    assert forced.returncode == 0 and out.exists() and report_of(out)["written"]
    assert "written although the data look unlike training (--force)" in forced.stdout


def test_the_checkpoints_own_records_judge_the_data(tmp_path):
    import json

    from bnguard.cli.checkpoints import Checkpoint, open_checkpoint, recorded_accuracy
    from bnguard.cli.commands import _unlike_training

    toy_loop(tmp_path / "run", epochs=2, checkpoint_every_epochs=1).fit()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert recorded_accuracy(open_checkpoint(tmp_path / "run" / "checkpoints" / "epoch-0002")) == last["eval_acc"]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "trainer_state.json").write_text(json.dumps(
        {"log_history": [{"eval_accuracy": 0.5}, {"loss": 0.3}, {"eval_accuracy": 0.96}]}))
    assert recorded_accuracy(Checkpoint(tmp_path / "hf", "Hugging Face folder")) == 0.96
    assert recorded_accuracy(Checkpoint(tmp_path / "model.pt", "state dict")) is None

    def findings(before, after):
        return {"before": {"accuracy": before, "classes": 4}, "after": {"accuracy": after, "classes": 4}}

    assert _unlike_training(findings(0.5, 0.6), 0.96) == ("its own records give 96.00% eval accuracy, and here: "
                                                          "50.00% with the stored statistics, 60.00% recalibrated")
    assert _unlike_training(findings(0.5, 0.9), 0.96) is None  # recalibration brought it back: stale, not unlike
    assert _unlike_training(findings(0.5, 0.6), None) is None
    assert _unlike_training(findings(0.26, 0.80), None) is None  # averaged weights: at chance until recalibrated


def test_a_tolerance_the_data_cannot_meet_is_said_with_what_would_meet_it(tmp_path):
    from bnguard import LayerReport, RecalibrationReport
    from bnguard.cli.commands import tolerance_unmet

    torch.manual_seed(0)
    source, out = tmp_path / "model.pt", tmp_path / "repaired.pt"
    torch.save(trained(tiny_resnet()).state_dict(), source)
    done = run_bnguard("recalibrate", source, *TINY_RESNET, "--data",
                       "tests/_support/cli_setup.py:loaders", "--tolerance", "0.01", "--out", out, "--force")
    assert done.returncode == 0, done.stderr
    report = report_of(out)
    bound = report["recalibration"]["error_bound"]
    assert bound > 0.01 and report["recalibration"]["stopped"] == "end of data"
    assert report["tolerance_unmet"] in done.stdout
    assert report["tolerance_unmet"].startswith(f"tolerance 0.01 not met: end of data at error bound {bound:.4f} "
                                                "after 48 samples; meeting it would take about")
    capped = RecalibrationReport(layers=[LayerReport("bn", samples=100, batches=10, error_bound=0.2)], samples=100,
                                 tolerance=0.1, stopped="num_samples reached")
    assert tolerance_unmet(capped) == ("tolerance 0.1 not met: num_samples reached at error bound 0.2000 after 100 "
                                       "samples; meeting it would take about 400 samples (a larger --samples), or "
                                       "--tolerance 0.2 accepts this bound")
    met = RecalibrationReport(layers=[LayerReport("bn", error_bound=0.05)], tolerance=0.1, stopped="tolerance met")
    assert tolerance_unmet(met) is None
