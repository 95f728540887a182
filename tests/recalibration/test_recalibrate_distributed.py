"""Real two-process gloo runs through Accelerate: every rank sees its own data, all end identical."""


import pytest
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
    batches = rank_batches(accelerator.process_index)
    report = bnguard.recalibrate(model, batches, accelerator=accelerator, progress=False)
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


def _count_what_is_pooled(out_dir: str):
    from torch.utils.data import DataLoader, TensorDataset

    accelerator = Accelerator(cpu=True)
    data = TensorDataset(torch.randn(13, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    model = make_model(sync=False)
    prepared = accelerator.prepare(DataLoader(data, batch_size=4))
    through_prepared = bnguard.recalibrate(model, prepared, accelerator=accelerator, progress=False)
    drawn = bnguard.TrainingBatches(DataLoader(data, batch_size=4), accelerator=accelerator, seed=5)
    mine = [batch[0] for batch in drawn()]
    drawn.draws -= 1
    report = bnguard.recalibrate(model, drawn(), accelerator=accelerator, progress=False)
    torch.save({"prepared": through_prepared.samples, "drawn": report.samples, "mine": mine,
                "buffers": {k: v.clone() for k, v in model.named_buffers()}},
               f"{out_dir}/count{accelerator.process_index}.pt")


def test_what_two_processes_pool_through_a_prepared_loader_and_through_training_batches(tmp_path):
    launch_two_processes(_count_what_is_pooled, str(tmp_path))
    ranks = [torch.load(tmp_path / f"count{r}.pt") for r in (0, 1)]
    assert [r["prepared"] for r in ranks] == [16, 16]  # 13 samples, 3 of them twice: as documented
    assert [r["drawn"] for r in ranks] == [8, 8]  # shares of 7 and 6 in batches of 4, short ones left out
    drawn = torch.cat([x for r in ranks for x in r["mine"]])
    assert len({tuple(x.flatten().tolist()) for x in drawn}) == 8  # each sample at most once
    single = make_model(sync=False)
    bnguard.recalibrate(single, [x for r in ranks for x in r["mine"]], progress=False)
    torch.testing.assert_close(ranks[0]["buffers"]["1.running_var"], single[1].running_var, rtol=1e-6, atol=0)
    assert_same_tensors(ranks[0]["buffers"], ranks[1]["buffers"])


def counted(batches: list[torch.Tensor], used: list[int]):
    for batch in batches:
        used[0] += 1
        yield batch


def tolerance_batches(rank: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + rank)
    return [torch.randn(8, 1, 8, 8, generator=generator) * (1 + rank) for _ in range(count)]  # spreads differ


def _stop_on_tolerance_on_each_rank(out_dir: str):
    accelerator = Accelerator(cpu=True)
    results = {}
    # Enough data on both ranks; then so uneven that one rank runs dry long before the other.
    for case, counts, tolerance in (("met", (200, 200), 0.3), ("uneven", (40, 7), 1e-4)):
        model, used = make_model(sync=False), [0]
        batches = tolerance_batches(accelerator.process_index, counts[accelerator.process_index])
        report = bnguard.recalibrate(model, counted(batches, used), tolerance=tolerance, accelerator=accelerator,
                                     progress=False)
        results[case] = {"used": used[0], "batches": report.batches, "stopped": report.stopped,
                         "bounds": [layer.error_bound for layer in report.recalibrated],
                         "buffers": {k: v.clone() for k, v in model.named_buffers()}}
    torch.save(results, f"{out_dir}/tolerance{accelerator.process_index}.pt")


def test_two_processes_stop_on_the_tolerance_together_with_the_statistics_of_what_they_used(tmp_path):
    launch_two_processes(_stop_on_tolerance_on_each_rank, str(tmp_path))
    ranks = [torch.load(tmp_path / f"tolerance{r}.pt") for r in (0, 1)]
    met, uneven = ([r[case] for r in ranks] for case in ("met", "uneven"))
    assert [r["stopped"] for r in met] == ["tolerance met"] * 2 and met[0]["used"] == met[1]["used"] < 200
    assert [r["stopped"] for r in uneven] == ["end of data"] * 2 and [r["used"] for r in uneven] == [40, 7]
    for case, counts in ((met, (200, 200)), (uneven, (40, 7))):
        assert_same_tensors(case[0]["buffers"], case[1]["buffers"])
        assert case[0]["bounds"] == case[1]["bounds"] and case[0]["batches"] == case[1]["batches"]
        used = [tolerance_batches(r, n)[:case[r]["used"]] for r, n in enumerate(counts)]
        single = make_model(sync=False)
        report = bnguard.recalibrate(single, used[0] + used[1], progress=False)
        assert report.batches == case[0]["batches"]
        for name, expected in single.named_buffers():
            torch.testing.assert_close(case[0]["buffers"][name], expected, rtol=1e-6, atol=1e-6)
        got = [layer.error_bound for layer in report.recalibrated]
        assert got == pytest.approx(case[0]["bounds"], rel=1e-6)
