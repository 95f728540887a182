"""Run by tests/test_transformers.py under `torchrun --nproc_per_node 2 hf_two_processes.py OUT`: a Trainer on 2
CPU processes (gloo); each rank saves what it ended with, and rank 0 writes the model card."""

import sys
from pathlib import Path

import torch

from bnguard import AutoRecalibrate, BNStatsLogger
from bnguard.integrations.transformers import BNGuardCallback
from hf_setup import ImageDicts, tiny_resnet, trainer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    guard = AutoRecalibrate(monitor="loss", higher_is_better=False)
    callback = BNGuardCallback([BNStatsLogger(every_n_steps=2), guard])
    model = tiny_resnet(bn_momentum=0.0)
    fit = trainer(out, [callback], model=model, train=ImageDicts(64), evaluation=ImageDicts(24, seed=1), epochs=2,
                  report_to="wandb", per_device_train_batch_size=8)
    fit.train()
    fit.create_model_card(model_name="tiny")  # rank 0 writes README.md from the log history
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    torch.save({"buffers": buffers, "records": callback.records, "history": guard.history,
                "best_metric": fit.state.best_metric}, out / f"rank{fit.args.process_index}.pt")
