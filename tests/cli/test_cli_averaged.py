"""Averaged weights (SWA, EMA) carry statistics of no network that ever existed: ``--target averaged`` repairs
them wherever the file keeps them, a state dict of its own, Lightning's WeightAveraging layout, or an
averaged model registered in a Loop checkpoint."""

import json

import torch
from torch.optim.swa_utils import AveragedModel

from cli_setup import TINY_RESNET, TOY_DATA, assert_repaired, loaders, report_of, run_bnguard, trained
from helpers import tiny_resnet

OFFSET = 10.0


def test_an_averaged_model_is_repaired_and_its_accuracy_rises(tmp_path):
    torch.manual_seed(1)
    model = tiny_resnet()
    averaged = AveragedModel(model)  # its buffers stay those of the copy: statistics of no trained network
    for epoch in range(4):
        trained(model, epochs=3, seed=epoch, lr=0.02, offset=OFFSET)  # inputs far from mean 0, variance 1
        averaged.update_parameters(model)
    source, out = tmp_path / "swa.pt", tmp_path / "swa-repaired.pt"
    torch.save({"model": model.state_dict(), "model_ema": averaged.state_dict(), "epoch": 8}, source)
    done = run_bnguard("recalibrate", source, "--target", "averaged", *TINY_RESNET,
                       *TOY_DATA, "--data-kwargs", json.dumps({"offset": OFFSET, "n_eval": 96}), "--out", out)
    assert done.returncode == 0, done.stderr
    report = report_of(out)
    assert report["location"] == "swa.pt['model_ema'], keys module.*"
    assert report["before"]["accuracy"] < 0.3 and report["after"]["accuracy"] > 0.75, report
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 8 and all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())
    loaded = AveragedModel(tiny_resnet())
    loaded.load_state_dict(saved["model_ema"])
    assert_repaired(loaded.module, averaged.module, loaders(offset=OFFSET)[0])
    assert torch.equal(loaded.n_averaged, averaged.n_averaged)


def test_lightnings_weight_averaging_checkpoint_gives_the_average_and_the_trained_model(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging

    from lightning_setup import Classifier

    torch.manual_seed(0)
    module = Classifier(width=4)
    train, evaluation = loaders(size=16)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[WeightAveraging(use_buffers=False), ModelCheckpoint(tmp_path, save_last=True)])
    trainer.fit(module, train, evaluation)
    source, out = tmp_path / "last.ckpt", tmp_path / "repaired.ckpt"
    lightning_module = ("--model", "tests/_support/lightning_setup.py:Classifier", "--data-kwargs", '{"size": 16}')
    trained_model = run_bnguard("inspect", source, *lightning_module)
    assert trained_model.returncode == 0 and "from last.ckpt['current_model_state']" in trained_model.stdout
    done = run_bnguard("recalibrate", source, "--target", "averaged", *lightning_module, *TOY_DATA, "--out", out,
                       "--force")
    assert done.returncode == 0, done.stderr
    assert report_of(out)["location"] == "last.ckpt['state_dict'], keys (no prefix)*"
    saved, repaired = torch.load(source, weights_only=True), torch.load(out, weights_only=True)
    torch.testing.assert_close(repaired["current_model_state"], saved["current_model_state"], rtol=0, atol=0)
    average = Classifier(width=4)
    average.load_state_dict(saved["state_dict"])
    assert_repaired(Classifier.load_from_checkpoint(out, width=4), average, loaders(size=16)[0])


def test_an_averaged_model_registered_in_a_loop_checkpoint_is_repaired_and_resumed(tmp_path):
    import bnguard
    from helpers import toy_loop

    class UpdateAverage(bnguard.Hook):
        def on_epoch_end(self, state):
            self.average.update_parameters(state.model)

    def loop_with_average(folder):
        hook = UpdateAverage()
        loop = toy_loop(folder, hooks=[hook], epochs=2, checkpoint_every_epochs=1)
        hook.average = AveragedModel(loop.model)
        loop.accelerator.register_for_checkpointing(hook.average)
        return loop, hook.average

    loop, average = loop_with_average(tmp_path / "run")
    loop.fit()
    source, out = tmp_path / "run" / "checkpoints" / "epoch-0002", tmp_path / "repaired"
    done = run_bnguard("recalibrate", source, "--target", "averaged", *TINY_RESNET,
                       *TOY_DATA, "--out", out, "--force")
    assert done.returncode == 0, done.stderr
    assert report_of(out)["location"] == "custom_checkpoint_3.pkl, keys module.*"
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    resumed, loaded = loop_with_average(tmp_path / "run")
    resumed.fit(resume_from=out)  # both epochs done: loads the checkpoint, the average with it
    assert_repaired(loaded.module, average.module, loaders()[0])
