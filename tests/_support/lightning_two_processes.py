"""Run by tests/test_lightning.py as `python lightning_two_processes.py OUT`: a Lightning DDP fit on 2 CPU
processes (Lightning starts the second one by running this script again); each rank saves what it ended with."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger

from bnguard import AutoRecalibrate, BNStatsLogger
from bnguard.integrations.lightning import BNGuardCallback
from lightning_setup import Classifier, loaders, trainer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    guard = AutoRecalibrate()
    callback = BNGuardCallback([BNStatsLogger(every_n_steps=2), guard])
    fit = trainer(out, [callback], epochs=4, devices=2, strategy="ddp",
                  logger=WandbLogger(save_dir=str(out), offline=True))
    model = Classifier(bn_momentum=0.0)
    fit.fit(model, *loaders(n_train=64, n_eval=24, shuffle=False))
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    torch.save({"buffers": buffers, "records": callback.records, "history": guard.history},
               out / f"rank{fit.global_rank}.pt")
