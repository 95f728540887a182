"""Fine-tuning with frozen BatchNorm: the hooks leave the layers training left alone."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import bnguard
from helpers import Residual, buffers_of, toy_data


class FineTuned(nn.Module):
    """A "pretrained" stem whose BatchNorm stays frozen whatever train() is told (the usual override), and a
    new block that trains."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Residual(4, 8, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-1, 1)
            self.stem[1].running_var.uniform_(0.5, 2)

    def train(self, mode=True):
        super().train(mode)
        self.stem[1].eval()
        return self

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_precise_bn_in_the_loop_keeps_frozen_statistics(tmp_path):
    torch.manual_seed(0)
    model = FineTuned()
    pretrained = buffers_of(model.stem[1])
    reports = []

    class Keep(bnguard.Hook):
        def on_recalibrated(self, state):
            reports.append(state.recalibration)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loop = bnguard.Loop(model, optimizer, DataLoader(toy_data(24), batch_size=4, shuffle=True),
                        eval_loader=DataLoader(toy_data(8, seed=1), batch_size=4), epochs=2,
                        hooks=[bnguard.PreciseBN(), Keep()], output_dir=tmp_path, progress=False)
    loop.fit()
    trained = loop.accelerator.unwrap_model(loop.model)
    for name, value in pretrained.items():
        assert torch.equal(buffers_of(trained.stem[1])[name].cpu(), value), name  # the loop may have moved it
    assert len(reports) == 2 and all(
        {layer.name: layer.skipped is None for layer in report.layers} ==
        {"stem.1": False, "block.bn1": True, "block.bn2": True, "block.project.1": True} for report in reports)


def test_auto_recalibrate_remembers_what_trained_even_if_evaluation_leaves_eval_mode():
    torch.manual_seed(0)
    model = FineTuned().train()
    frozen_before, trained_before = buffers_of(model.stem[1]), buffers_of(model.block.bn1)
    batches = list(DataLoader(toy_data(16), batch_size=8))
    guard = bnguard.AutoRecalibrate(num_samples=16)
    runner = bnguard.HookRunner([guard], model=model, evaluate=lambda: {"eval_acc": 0.9},
                                train_batches=lambda: batches)
    runner.fire("on_step_end", step=1)  # the loop trains: the stem's BatchNorm is not updating
    model.eval()  # an evaluate() that forgets to put the model back in train mode
    runner.fire("on_eval_end", eval_metrics={"eval_acc": 0.3}, train_metrics={"train_acc": 0.9})
    assert guard.history[-1]["recalibrated"]
    assert all(torch.equal(buffers_of(model.stem[1])[k], v) for k, v in frozen_before.items())
    assert not torch.equal(buffers_of(model.block.bn1)["running_var"], trained_before["running_var"])

    everything = bnguard.AutoRecalibrate(num_samples=16, include_frozen=True)
    runner = bnguard.HookRunner([everything], model=model, evaluate=lambda: {"eval_acc": 0.9},
                                train_batches=lambda: batches)
    runner.fire("on_step_end", step=1)
    runner.fire("on_eval_end", eval_metrics={"eval_acc": 0.3}, train_metrics={"train_acc": 0.9})
    assert not torch.equal(buffers_of(model.stem[1])["running_var"], frozen_before["running_var"])


def frozen_by_hand():
    """The idiom without any train() override: model.train(), then the stem's BatchNorm .eval()."""
    torch.manual_seed(0)
    model = FineTuned()
    model.train = nn.Module.train.__get__(model)  # a plain train(), as most models have
    model.train()
    model.stem[1].eval()
    return model


def test_loop_keeps_layers_frozen_by_hand_in_eval_mode_through_training_and_evaluation(tmp_path):
    model = frozen_by_hand()
    pretrained, trained_before = buffers_of(model.stem[1]), buffers_of(model.block)
    loop = bnguard.Loop(model, torch.optim.SGD(model.parameters(), lr=0.05), DataLoader(toy_data(24), batch_size=4),
                        eval_loader=DataLoader(toy_data(8, seed=1), batch_size=4), epochs=2, eval_every_steps=3,
                        output_dir=tmp_path, progress=False, hooks=[bnguard.PreciseBN()])
    loop.fit()
    assert not model.stem[1].training and model.block.bn1.training
    for name, value in buffers_of(model.stem[1]).items():
        assert torch.equal(value, pretrained[name]), name
    assert not torch.equal(buffers_of(model.block)["bn1.running_mean"], trained_before["bn1.running_mean"])


def test_a_model_whose_batchnorm_is_all_frozen_is_not_recorded_as_recalibrated(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4))
    model.train()
    model[1].eval()
    auto, precise = bnguard.AutoRecalibrate(gap_threshold=-1.0), bnguard.PreciseBN()
    loop = bnguard.Loop(model, torch.optim.SGD(model.parameters(), lr=0.05), DataLoader(toy_data(16), batch_size=4),
                        eval_loader=DataLoader(toy_data(8, seed=1), batch_size=4), epochs=1, output_dir=tmp_path,
                        progress=False, hooks=[precise, auto])
    with pytest.warns(UserWarning) as said:
        record = loop.fit()
    assert [str(w.message) for w in said] == [f"{hook} recalibrated nothing in Sequential: all 1 BatchNorm layers "
                                              "skipped (1 frozen: its statistics were not updating in training "
                                              "(include_frozen=True)); include_frozen=True recalibrates frozen layers "
                                              "too" for hook in ("PreciseBN", "AutoRecalibrate")]
    for hook in ("PreciseBN", "AutoRecalibrate"):  # two deciding hooks: each under its own name
        assert record[f"{hook}/recalibrated"] is False and record[f"{hook}/recal_samples"] == 0
        assert "nothing recalibrated: all 1 BatchNorm layers skipped (1 frozen" in record[f"{hook}/reason"]
    assert auto.history[-1]["recalibrated"] is False and auto.history[-1]["samples"] == 0
