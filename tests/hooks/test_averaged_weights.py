"""Averaged weights (SWA / EMA): their statistics belong to no weights the network ever had, until recalibrated."""

import copy

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

import bnguard
from helpers import assert_same_tensors, buffers_of, launch_two_processes, tiny_resnet, toy_data


def trained_with_swa():
    """A model trained 4 epochs with an AveragedModel of it updated every step; the AveragedModel keeps the
    BatchNorm buffers it copied at creation, as torch's does by default."""
    torch.manual_seed(0)
    model = tiny_resnet()
    swa = AveragedModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = toy_data(64)
    for _ in range(4):
        for images, labels in DataLoader(data, batch_size=8, shuffle=True):
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
            swa.update_parameters(model)
    return model, swa, data


def accuracy(model, data):
    images, labels = data.tensors
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).double().mean().item()


def test_precise_bn_recalibrates_the_averaged_model_before_it_is_evaluated():
    model, swa, data = trained_with_swa()
    evaluation = toy_data(128, seed=1)
    batches = list(DataLoader(data, batch_size=8))
    expected = copy.deepcopy(swa)
    bnguard.recalibrate(expected, batches, progress=False)
    trained_buffers, copied = buffers_of(model), accuracy(swa, evaluation)
    runner = bnguard.HookRunner([bnguard.PreciseBN(target=lambda: swa)], model=model.train(),
                                train_batches=lambda: batches)
    runner.fire("on_fit_start")
    runner.fire("on_eval_start")
    recalibrated = accuracy(swa, evaluation)
    assert recalibrated >= copied + 0.1, (copied, recalibrated)  # copied statistics are visibly worse
    assert_same_tensors(buffers_of(expected), buffers_of(swa))
    assert_same_tensors(trained_buffers, buffers_of(model))  # the trained model is left alone


def test_auto_recalibrate_judges_the_averaged_model():
    model, swa, data = trained_with_swa()
    evaluation = toy_data(128, seed=1)
    guard = bnguard.AutoRecalibrate(target=swa, num_samples=64)
    runner = bnguard.HookRunner([guard], model=model.train(), evaluate=lambda: {"eval_acc": accuracy(swa, evaluation)},
                                train_batches=lambda: DataLoader(data, batch_size=8))
    runner.fire("on_eval_end", eval_metrics={"eval_acc": accuracy(swa, evaluation)}, train_metrics={"train_acc": 1.0})
    decision = guard.history[-1]
    assert decision["recalibrated"] and decision["diagnosis"] == bnguard.Verdict.STALE
    assert decision["eval_after"] >= decision["eval_before"] + 0.1


def _averaged_on_two_ranks(out_dir: str):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, swa, data = trained_with_swa()  # the same weights on both ranks
    batches = bnguard.TrainingBatches(DataLoader(data, batch_size=8), accelerator=accelerator)
    runner = bnguard.HookRunner([bnguard.PreciseBN(target=swa)], accelerator=accelerator, model=model,
                                train_batches=batches)
    runner.fire("on_fit_start")
    runner.fire("on_eval_start")
    batches.draws -= 1  # this rank's share of the same draw, for the single-process check
    torch.save({"buffers": buffers_of(swa), "mine": list(batches())}, f"{out_dir}/swa{accelerator.process_index}.pt")


def test_two_processes_recalibrate_the_averaged_model_identically(tmp_path):
    launch_two_processes(_averaged_on_two_ranks, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"swa{r}.pt") for r in (0, 1))
    assert_same_tensors(rank0["buffers"], rank1["buffers"])
    _, single, _ = trained_with_swa()
    bnguard.recalibrate(single, rank0["mine"] + rank1["mine"], progress=False)
    for name, value in buffers_of(single).items():
        torch.testing.assert_close(rank0["buffers"][name], value, rtol=1e-5, atol=1e-6)  # pooled in another order
