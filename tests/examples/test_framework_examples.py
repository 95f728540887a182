"""examples/lightning_train.py and examples/hf_trainer.py end to end, on 2 epochs."""


from torch import nn

from wandb_log import history, offline_run_dir  # noqa: E402


def test_lightning_example_compares_without_and_with_bnguard(tmp_path, capsys):
    from lightning_train import main

    results = main(["--compare", "--epochs", "2", "--wandb", "off", "--accelerator", "cpu", "--output-dir",
                    str(tmp_path)])
    assert [r["epoch"] for r in results["off"]] == [r["epoch"] for r in results["auto"]] == [1, 2]
    assert [r["train_acc"] for r in results["off"]] == [r["train_acc"] for r in results["auto"]]  # same weights
    assert "recalibrated" not in results["off"][0] and "reason" in results["auto"][0]  # off: no hooks
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "[auto] best val_acc" in out and f"plot in {tmp_path / 'accuracy.png'}" in out


def test_hf_example_logs_every_batchnorm_layer_and_checkpoints_the_hooks(tmp_path, monkeypatch, capsys):
    from hf_trainer import main

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    trainer = main(["--epochs", "2", "--cpu", "--output-dir", str(tmp_path)])
    names = [n for n, m in trainer.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    rows = history(offline_run_dir(tmp_path))
    for name in names:
        assert any(r.get(f"bn/{name}/running_var/_type") == "histogram" for r in rows), name
    assert all((folder / "bnguard_hooks.pt").exists() for folder in tmp_path.glob("checkpoint-*"))
    out = capsys.readouterr().out
    assert "[auto] best eval_loss" in out and f"W&B run in {offline_run_dir(tmp_path).parent}" in out
