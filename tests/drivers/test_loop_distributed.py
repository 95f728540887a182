"""The loop in two real processes joined by gloo through Accelerate."""

import json

import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnguard import Hook
from helpers import launch_two_processes, toy_loop


class LogsRank(Hook):
    def on_epoch_end(self, state):
        state.log({"from_rank": float(state.accelerator.process_index)})


def _train_on_two_ranks(out_dir: str):
    accelerator = Accelerator(cpu=True)
    loop = toy_loop(out_dir, hooks=[LogsRank()], epochs=2, n_eval=13, accelerator=accelerator, tracker="tensorboard")
    final = loop.fit()
    torch.save({"final": final, "state": accelerator.unwrap_model(loop.model).state_dict()},
               f"{out_dir}/rank{accelerator.process_index}.pt")


def test_two_processes_count_each_eval_sample_once_and_log_once(tmp_path):
    launch_two_processes(_train_on_two_ranks, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["final"] == {**rank1["final"], "seconds": rank0["final"]["seconds"]}
    # 24 training samples over 2 processes in batches of 4: 3 steps per epoch
    assert rank0["final"]["step"] == 6

    model = toy_loop(tmp_path / "check", epochs=1, n_eval=13).model
    model.load_state_dict(rank0["state"])
    images, labels = toy_loop(tmp_path / "check2", epochs=1, n_eval=13).eval_loader.dataset.tensors
    with torch.no_grad():
        correct = (model.eval()(images).argmax(1) == labels).sum().item()
    assert rank0["final"]["eval_acc"] == correct / 13

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # written once, by the main process
    (event_file,) = (tmp_path / "tensorboard").glob("*/events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("from_rank")] == [(3, 0.0), (6, 0.0)]
    assert [e.step for e in events.Scalars("eval_acc")] == [3, 6]
