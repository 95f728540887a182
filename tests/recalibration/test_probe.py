"""The staleness probe: a metric in eval mode and with batch statistics, with nothing left changed."""

import torch
import torch.nn.functional as F
from torch import nn

import bnguard
from bnguard.recalibration.probe import probe
from helpers import assert_same_tensors, buffers_of


def stale_layer():
    layer = nn.BatchNorm1d(3)
    with torch.no_grad():
        layer.running_mean.fill_(5.0)
        layer.running_var.fill_(4.0)
    return nn.Sequential(layer, nn.Dropout(0.5)).train()


def test_scores_both_modes_with_the_given_score_and_budget():
    model = stale_layer()
    batches = [(torch.randn(8, 3) + k, torch.zeros(8)) for k in range(4)]
    before = buffers_of(model)
    rng = torch.get_rng_state()

    def score(outputs, batch):  # per sample: mean |output|
        return outputs.abs().mean(dim=1)

    eval_mode, train_mode = probe(model, batches, score, num_samples=12)  # 12 samples: two batches used whole
    layer = model[0]
    used = torch.cat([x for x, _ in batches[:2]])
    expected_eval = F.batch_norm(used, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                 eps=layer.eps).abs().mean(dim=1).double().mean().item()
    expected_train = torch.cat([F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
                                for x, _ in batches[:2]]).abs().mean(dim=1).double().mean().item()
    assert abs(eval_mode - expected_eval) < 1e-6 and abs(train_mode - expected_train) < 1e-6
    assert_same_tensors(before, buffers_of(model))
    assert model.training and model[1].training and torch.equal(rng, torch.get_rng_state())


def test_auto_recalibrate_probes_with_its_own_score():
    model = stale_layer()
    batches = [(torch.randn(16, 3), torch.zeros(16))]
    seen = []

    def score(outputs, batch):
        seen.append(batch[0].shape)
        return -outputs.square().mean(dim=1)  # higher is better

    guard = bnguard.AutoRecalibrate(probe_samples=16, probe_score=score, num_samples=16)
    decision = guard.check(model, eval_value=0.2, train_value=0.9, evaluate=lambda: {"eval_acc": 0.9},
                           batches=batches)
    assert seen == [torch.Size([16, 3])] * 2  # eval mode, then batch statistics
    assert decision.recalibrated and decision.diagnosis is bnguard.Verdict.STALE
