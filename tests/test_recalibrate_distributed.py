"""Real two-process gloo runs through Accelerate: every rank sees its own data, all end identical."""


import torch
from accelerate import Accelerator
from torch import nn

import bnguard
from helpers import assert_same_tensors, launch_two_processes, tiny_resnet


def rank_batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    # Different sizes and centers on each rank, so a wrong merge cannot pass by symmetry.
    sizes = [6, 3, 5] if rank == 0 else [4, 7]
    return [torch.randn(n, 1, 8, 8, generator=generator) * (1 + rank) + 3 * rank for n in sizes]


def make_model(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_resnet()
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def _recalibrate_on_each_rank(out_dir: str, sync: bool):
    accelerator = Accelerator(cpu=True)
    model = make_model(sync)
    if not sync:  # DDP refuses SyncBatchNorm on CPU; the layers themselves must still work here
        model = accelerator.prepare(model)
    report = bnguard.recalibrate(model, rank_batches(accelerator.process_index), accelerator=accelerator, progress=False)
    buffers = {k: v.clone() for k, v in accelerator.unwrap_model(model).named_buffers()}
    torch.save({"buffers": buffers, "batches": report.batches, "samples": report.samples},
               f"{out_dir}/rank{accelerator.process_index}.pt")


def check_two_ranks(tmp_path, sync: bool):
    launch_two_processes(_recalibrate_on_each_rank, str(tmp_path), sync)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert_same_tensors(rank0["buffers"], rank1["buffers"])  # bit-identical across ranks
    assert rank0["batches"] == rank1["batches"] == 5
    assert rank0["samples"] == 25

    single = make_model(sync=False)
    bnguard.recalibrate(single, rank_batches(0) + rank_batches(1), progress=False)
    for name, expected in single.named_buffers():
        got = rank0["buffers"][name]
        if name.endswith("num_batches_tracked"):
            assert got.item() == expected.item() == 5
        else:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_two_processes_end_identical_and_equal_to_the_union(tmp_path):
    check_two_ranks(tmp_path, sync=False)


def test_sync_batchnorm_on_cpu_under_gloo(tmp_path):
    check_two_ranks(tmp_path, sync=True)
