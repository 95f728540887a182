"""Streaming training data: hooks recalibrate on a recalibration_loader of any kind."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import bnguard
from helpers import tiny_resnet, toy_data


class Stream(IterableDataset):
    """A training stream: no length, no indexing."""

    def __init__(self, n):
        self.data = toy_data(n)

    def __iter__(self):
        return iter(self.data)


def streaming_loop(tmp_path, hooks, **kwargs):
    torch.manual_seed(0)
    model = tiny_resnet()
    return bnguard.Loop(model, torch.optim.SGD(model.parameters(), lr=0.05), DataLoader(Stream(24), batch_size=4),
                        eval_loader=DataLoader(toy_data(8, seed=1), batch_size=4), hooks=hooks, epochs=2,
                        output_dir=tmp_path, progress=False, **kwargs)


def test_a_stream_recalibrates_on_its_recalibration_loader_even_a_short_one(tmp_path):
    reports = []

    class Keep(bnguard.Hook):
        def on_recalibrated(self, state):
            reports.append(state.recalibration)

    recalibration = DataLoader(Stream(10), batch_size=4)  # a stream too, shorter than the budget
    streaming_loop(tmp_path, [bnguard.PreciseBN(num_samples=4096), Keep()], recalibration_loader=recalibration).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["recal_samples"] for r in rows] == [10, 10] and [r.batches for r in reports] == [3, 3]


@pytest.mark.parametrize("hook", [bnguard.PreciseBN(), bnguard.AutoRecalibrate()])
def test_a_stream_without_a_recalibration_loader_says_what_to_pass(tmp_path, hook):
    with pytest.raises(bnguard.HookError, match="pass train_batches= .* or recalibration_loader="):
        streaming_loop(tmp_path, [hook]).fit()


def test_a_stream_needs_nothing_for_hooks_that_draw_no_batch(tmp_path):
    final = streaming_loop(tmp_path, [bnguard.BNStatsLogger(), bnguard.AutoRecalibrate(report_only=True)]).fit()
    assert final["epoch"] == 2 and final["recalibrated"] is False
