"""Recalibration batches are as large as the training batches, in every form of training loader: plain, with
a batch sampler, prepared by Accelerate (whose own ``batch_size`` is None), on one process and on two."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler

import bnguard
from helpers import launch_two_processes, tiny_resnet, toy_data, toy_loop


def sizes(batches) -> list[int]:
    return [len(batch[0]) for batch in batches]


def training_loader(form: str, data, batch_size: int = 8) -> DataLoader:
    if form == "batch_sampler":
        return DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), batch_size, drop_last=False))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def prepared(loader: DataLoader, split_batches: bool = False) -> DataLoader:
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=split_batches))
    loader = accelerator.prepare(loader)
    assert loader.batch_size is None  # what made recalibration draw batches of one sample
    return loader


@pytest.mark.parametrize("form", ["plain", "batch_sampler"])
@pytest.mark.parametrize("prepare", ["unprepared", "prepared", "prepared, split batches"])
def test_training_batches_are_batched_like_the_loader(form, prepare):
    loader = training_loader(form, toy_data(40))
    if prepare != "unprepared":
        loader = prepared(loader, split_batches="split" in prepare)
    drawn = bnguard.TrainingBatches(loader)
    assert drawn.batch_size == 8
    assert sizes(drawn()) == [8] * 5


def test_a_batch_sampler_without_a_size_is_named_with_the_fix():
    class Pairs:  # a batch sampler of its own: no batch_size attribute
        def __iter__(self):
            return iter([[0, 1], [2, 3]])

        def __len__(self):
            return 2

    with pytest.raises(TypeError, match=r"batch sampler \(Pairs\) has no batch_size.*recalibration_loader="):
        bnguard.TrainingBatches(DataLoader(toy_data(4), batch_sampler=Pairs()))


class Stream(IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def with_batchnorm_after_pooling() -> nn.Module:
    """BatchNorm1d on the pooled features: one value per channel per sample, so batches of one sample leave
    it out of a recalibration."""
    torch.manual_seed(0)
    return nn.Sequential(*list(tiny_resnet())[:-1], nn.BatchNorm1d(8), nn.Linear(8, 4))


@pytest.mark.parametrize("source", ["train_loader", "recalibration_loader over a stream"])
def test_a_guard_built_after_prepare_recalibrates_every_layer_on_full_batches(source):
    accelerator = Accelerator(cpu=True)
    model = with_batchnorm_after_pooling()
    if source == "train_loader":
        loaders = {"train_loader": accelerator.prepare(DataLoader(toy_data(40), batch_size=8, shuffle=True))}
    else:
        loaders = {"recalibration_loader": accelerator.prepare(DataLoader(Stream(toy_data(40)), batch_size=8))}
    model = accelerator.prepare(model)
    guard = bnguard.Guard(model, [bnguard.PreciseBN(tolerance=None, num_samples=40, monitor=None)],
                          evaluate=lambda: 0.5, accelerator=accelerator, **loaders)
    guard.evaluate()
    report = guard.state.recalibration
    assert (report.batches, report.samples) == (5, 40)
    assert [layer.name for layer in report.skipped] == []
    assert len(report.recalibrated) == 7 and report.recalibrated[-1].name == "8"  # the BatchNorm1d too


def test_the_loop_draws_batches_of_its_training_batch_size(tmp_path):
    loop = toy_loop(tmp_path, batch_size=6, n_train=24, tracker="none")
    assert loop.train_loader.batch_size is None
    assert sizes(loop.train_batches()) == [6] * 4


def _draw_on_each_rank(out_dir: str) -> None:
    data, drawn = toy_data(40), {}
    for split in (False, True):
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=split))
        loader = accelerator.prepare(DataLoader(data, batch_size=8, shuffle=True))
        batches = list(bnguard.TrainingBatches(loader, accelerator=accelerator)())
        trained = next(iter(loader))
        drawn[split] = {"sizes": sizes(batches), "trained": len(trained[0]),
                        "images": torch.cat([b[0] for b in batches])}
    torch.save(drawn, f"{out_dir}/rank{accelerator.process_index}.pt")


def test_a_prepared_loader_on_two_processes_is_drawn_at_each_process_batch_size(tmp_path):
    launch_two_processes(_draw_on_each_rank, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank in ranks:
        assert rank[False]["trained"] == 8 and rank[False]["sizes"] == [8, 8]  # 20 samples each, short one dropped
        assert rank[True]["trained"] == 4 and rank[True]["sizes"] == [4] * 5  # split: 8 a step over both
    for split in (False, True):  # every sample drawn at most once over the two processes
        images = torch.cat([rank[split]["images"] for rank in ranks]).flatten(1)
        assert len(torch.unique(images, dim=0)) == len(images)
