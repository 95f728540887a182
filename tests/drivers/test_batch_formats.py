"""Dict batches and models that compute their own loss, the Hugging Face convention, everywhere."""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import bnguard
from helpers import assert_same_tensors, buffers_of, launch_two_processes, tiny_resnet, toy_data
from wandb_log import history, offline_run_dir


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class DictNet(nn.Module):
    """Takes pixel_values= and labels=, returns an output with .logits and, given labels, .loss."""

    def __init__(self):
        super().__init__()
        self.body = tiny_resnet()

    def forward(self, pixel_values, labels=None):
        logits = self.body(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return Output(loss, logits)


class Dicts(Dataset):
    def __init__(self, n, seed=0):
        self.data = toy_data(n, seed=seed)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        return {"pixel_values": image, "labels": label}


def dict_loop(out, accelerator=None, **kwargs):
    torch.manual_seed(0)
    model = DictNet()
    return bnguard.Loop(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                        DataLoader(Dicts(24), batch_size=4, shuffle=True),
                        eval_loader=DataLoader(Dicts(10, seed=1), batch_size=4), epochs=2, output_dir=out,
                        progress=False, accelerator=accelerator, **kwargs)


def test_a_dict_batch_model_trains_end_to_end_with_every_hook(tmp_path):
    loop = dict_loop(tmp_path, compute_loss=bnguard.loss_from_model, tracker="wandb",
                     hooks=[bnguard.BNStatsLogger(every_n_steps=2), bnguard.AutoRecalibrate(gap_threshold=-1.0)])
    with pytest.warns(UserWarning, match="torchinfo could not summarize"):  # a dataclass output is beyond it
        final = loop.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["recal_samples"] == 24
    model = loop.accelerator.unwrap_model(loop.model).eval()
    evaluation = Dicts(10, seed=1).data.tensors
    with torch.no_grad():
        logits = model(evaluation[0]).logits
    assert final["eval_acc"] == pytest.approx((logits.argmax(1) == evaluation[1]).double().mean().item())
    logged = {r["_step"] for r in history(offline_run_dir(tmp_path)) if r.get("bn/body.1/running_var/_type")}
    assert {2, 6, 12} <= logged


def test_the_default_loss_works_on_dict_batches_too(tmp_path):
    mine, theirs = dict_loop(tmp_path / "a"), dict_loop(tmp_path / "b", compute_loss=bnguard.loss_from_model)
    assert mine.fit()["train_loss"] == pytest.approx(theirs.fit()["train_loss"], rel=1e-6)


def test_recalibrate_says_what_to_pass_for_batches_it_cannot_use():
    with pytest.raises(TypeError, match="batches is one tensor"):
        bnguard.recalibrate(tiny_resnet(), torch.randn(4, 1, 8, 8), progress=False)
    plain = tiny_resnet()  # takes one positional input, not pixel_values=
    with pytest.raises(TypeError, match=r"does not take this batch's keys \['labels', 'pixel_values'\].*forward="):
        bnguard.recalibrate(plain, DataLoader(Dicts(8), batch_size=4), progress=False)


def test_a_batchnorm_layer_called_with_a_keyword_is_recalibrated():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(input=x)

    batches = [torch.randn(8, 3) for _ in range(2)]
    keyword, positional = Keyword(), nn.Sequential(nn.BatchNorm1d(3))
    bnguard.recalibrate(keyword, batches, progress=False)
    bnguard.recalibrate(positional, batches, progress=False)
    assert torch.equal(keyword.bn.running_var, positional[0].running_var)


def _dict_batches_on_two_ranks(out_dir: str):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    loop = dict_loop(out_dir, accelerator=accelerator, compute_loss=bnguard.loss_from_model,
                     hooks=[bnguard.AutoRecalibrate(gap_threshold=-1.0)])
    loop.fit()
    torch.save({"history": loop.runner.hooks[0].history, "buffers": buffers_of(accelerator.unwrap_model(loop.model))},
               f"{out_dir}/dict{accelerator.process_index}.pt")


def test_dict_batches_on_two_processes(tmp_path):
    launch_two_processes(_dict_batches_on_two_ranks, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"dict{r}.pt", weights_only=False) for r in (0, 1))
    strip = lambda h: [{k: v for k, v in d.items() if k != "seconds"} for d in h]  # noqa: E731
    assert strip(rank0["history"]) == strip(rank1["history"]) and rank0["history"][0]["samples"] == 24
    assert_same_tensors(rank0["buffers"], rank1["buffers"])


class PlainDictNet(DictNet):
    """Returns a plain dict ``{"logits", "loss"}``, as many hand-written models do."""

    def forward(self, pixel_values, labels=None):
        output = super().forward(pixel_values, labels)
        return {"logits": output.logits, "loss": output.loss}


@pytest.mark.parametrize("compute_loss", [None, bnguard.loss_from_model])
def test_a_model_returning_a_plain_dict_trains_and_is_probed(tmp_path, compute_loss):
    torch.manual_seed(0)
    model = PlainDictNet()
    guard = bnguard.AutoRecalibrate(gap_threshold=-1.0, probe_samples=8)  # probe, then recalibrate each time
    loop = bnguard.Loop(model, torch.optim.SGD(model.parameters(), lr=0.05), DataLoader(Dicts(24), batch_size=4),
                        eval_loader=DataLoader(Dicts(8, seed=1), batch_size=4), epochs=2, output_dir=tmp_path,
                        progress=False, hooks=[guard], compute_loss=compute_loss)
    final = loop.fit()
    torch.manual_seed(0)
    reference = DictNet()  # the same network, its output a dataclass
    dataclass_loop = bnguard.Loop(reference, torch.optim.SGD(reference.parameters(), lr=0.05),
                                  DataLoader(Dicts(24), batch_size=4), eval_loader=DataLoader(Dicts(8, seed=1),
                                  batch_size=4), epochs=2, output_dir=tmp_path / "ref", progress=False,
                                  hooks=[bnguard.AutoRecalibrate(gap_threshold=-1.0, probe_samples=8)],
                                  compute_loss=compute_loss)
    assert final["train_loss"] == dataclass_loop.fit()["train_loss"]
    assert len(guard.history) == 2 and all(d["reason"] for d in guard.history)
