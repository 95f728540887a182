"""bnguard.Guard in hand-written loops: plain PyTorch, Accelerate (1 and 2 processes), an EMA copy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import bnguard
from bnguard.hooks.overview import Overview
from helpers import (
    ON_EACH_DEVICE,
    assert_same_tensors,
    buffers_of,
    launch_two_processes,
    parameters_of,
    tiny_resnet,
    toy_data,
)


def stale_model(dropout=0.3):
    """Momentum 0: the running statistics never leave their initial values, so eval mode is stale at every
    evaluation and AutoRecalibrate has work each time."""
    torch.manual_seed(0)
    model = tiny_resnet(dropout=dropout)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.0
    return model


def evaluator(model, loader, device="cpu"):
    """A typical evaluate function: a new loader iterator (which draws from the global random stream)."""
    def evaluate():
        model.eval()
        hits, losses, seen = 0, 0.0, 0
        with torch.no_grad():
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                outputs = model(images)
                hits += (outputs.argmax(1) == labels).sum().item()
                losses += F.cross_entropy(outputs, labels, reduction="sum").item()
                seen += len(labels)
        model.train()
        return {"acc": hits / seen, "loss": losses / seen}
    return evaluate


def plain_loop(epochs, guarded, hooks=None, checkpoint=None, resume=None, stop_after=None, device="cpu"):
    """A plain PyTorch loop on ``device``, with the Guard's three calls when ``guarded``. Returns the model, what
    the loop saw and, with a guard, the guard."""
    model = stale_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_loader = DataLoader(toy_data(48), batch_size=8, shuffle=True)
    evaluate = evaluator(model, DataLoader(toy_data(32, seed=1), batch_size=8, shuffle=True), device)
    guard = bnguard.Guard(model, hooks, evaluate=evaluate, train_loader=train_loader) if guarded else None
    seen = {"hits": [], "metrics": []}
    first = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        guard.load_state_dict(resume["guard"])
        torch.set_rng_state(resume["rng"])
        if device == "cuda":
            torch.cuda.set_rng_state(resume["cuda_rng"])
        first = resume["epoch"] + 1
    for epoch in range(first, epochs):
        model.train()
        hits = seen_samples = 0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            loss = F.cross_entropy(outputs, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            hits += (outputs.argmax(1) == labels).sum().item()
            seen_samples += len(labels)
            if guard is not None:
                guard.step(outputs, labels, loss=loss)
        metrics = evaluate()
        if guard is not None:
            metrics = guard.evaluated(metrics)
        seen["hits"].append(hits / seen_samples)
        seen["metrics"].append(metrics)
        if checkpoint is not None:
            checkpoint.append({"model": copy.deepcopy(model.state_dict()), "epoch": epoch,
                               "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": torch.get_rng_state(),
                               "cuda_rng": torch.cuda.get_rng_state() if device == "cuda" else None,
                               "guard": copy.deepcopy(guard.state_dict())})
        if stop_after is not None and epoch == stop_after:
            return model, seen, guard
    if guard is not None:
        guard.end()
    return model, seen, guard


@ON_EACH_DEVICE
def test_plain_loop_trains_bit_identically_with_the_guard_recalibrating_every_epoch(device):
    bare, bare_seen, _ = plain_loop(4, guarded=False, device=device)
    model, seen, guard = plain_loop(4, guarded=True, device=device)
    assert_same_tensors(parameters_of(bare), parameters_of(model))  # dropout, shuffles: the same stream
    decisions = guard.runner.hooks[1].history
    assert sum(d["recalibrated"] for d in decisions) >= 3, decisions
    # train accuracy is what the loop counted by hand, epoch by epoch
    assert [r["train_acc"] for r in guard.records] == pytest.approx(seen["hits"], abs=1e-12)
    assert [r["epoch"] for r in guard.records] == [1, 2, 3, 4]
    assert [r["step"] for r in guard.records] == [6, 12, 18, 24]
    for metrics, bare_metrics, decision in zip(seen["metrics"], bare_seen["metrics"], decisions):
        assert metrics.keys() == {"acc", "loss"}  # the script's own names
        if decision["recalibrated"]:  # and the re-evaluation's values
            assert metrics["acc"] == decision["eval_after"] != bare_metrics["acc"]


def test_the_returned_metrics_are_a_fresh_evaluation_with_the_new_statistics():
    model, seen, guard = plain_loop(2, guarded=True)
    decision = guard.runner.hooks[1].history[-1]
    assert decision["recalibrated"]
    again = evaluator(model, DataLoader(toy_data(32, seed=1), batch_size=8))()
    assert seen["metrics"][-1]["acc"] == again["acc"]
    assert seen["metrics"][-1]["loss"] == pytest.approx(again["loss"], rel=1e-6)  # float32 batches in another order
    assert guard.records[-1]["eval_acc_before_recal"] == decision["eval_before"]


@ON_EACH_DEVICE
def test_resume_from_the_users_checkpoint_equals_an_uninterrupted_run(device):
    whole, whole_seen, whole_guard = plain_loop(4, guarded=True, device=device)
    saved = []
    plain_loop(4, guarded=True, checkpoint=saved, stop_after=1, device=device)
    resumed, resumed_seen, resumed_guard = plain_loop(4, guarded=True, resume=saved[1], device=device)
    assert_same_tensors(parameters_of(whole), parameters_of(resumed))
    assert_same_tensors(buffers_of(whole), buffers_of(resumed))
    timing = ("recal_seconds", "seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(resumed_guard.records) == strip(whole_guard.records)
    assert strip(resumed_guard.runner.hooks[1].history) == strip(whole_guard.runner.hooks[1].history)
    assert resumed_seen["metrics"] == whole_seen["metrics"][2:]


def test_start_epoch_allows_several_evaluations_per_epoch():
    model = stale_model(dropout=0.0)
    evaluate = evaluator(model, DataLoader(toy_data(16, seed=1), batch_size=8))
    guard = bnguard.Guard(model, [bnguard.PreciseBN()], evaluate=evaluate,
                          train_loader=DataLoader(toy_data(16), batch_size=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = list(DataLoader(toy_data(32), batch_size=8))
    for epoch in range(2):
        guard.start_epoch(epoch)
        for index, (images, labels) in enumerate(batches):
            outputs = model(images)
            F.cross_entropy(outputs, labels).backward()
            optimizer.step()
            optimizer.zero_grad()
            guard.step(outputs, labels)
            if index % 2 == 1:
                stale = evaluate()
                fresh = guard.evaluated(stale)  # PreciseBN recalibrated first: bnguard evaluated again
                assert fresh == evaluate() and fresh != stale
    guard.end()
    assert [(r["epoch"], r["step"]) for r in guard.records] == [(1, 4), (2, 8)]
    assert [r["recalibrated"] for r in guard.records] == [True, True]


def test_a_single_number_comes_back_as_a_number_and_losses_come_from_the_outputs():
    model = stale_model(dropout=0.0)
    evaluate = evaluator(model, DataLoader(toy_data(16, seed=1), batch_size=8))
    guard = bnguard.Guard(model, [bnguard.AutoRecalibrate(monitor="top1")], metric_name="top1",
                          evaluate=lambda: 100 * evaluate()["acc"], train_loader=DataLoader(toy_data(16), batch_size=8))
    images, labels = toy_data(8).tensors
    outputs = model(images)
    guard.step({"logits": outputs, "loss": F.cross_entropy(outputs, labels)}, batch=(images, labels))
    assert guard.state.step == 1
    value = guard.evaluated(100 * evaluate()["acc"])
    assert isinstance(value, float)
    assert guard.state.eval_metrics == {"eval_top1": value}
    expected = F.cross_entropy(outputs, labels).item()
    assert guard.records[-1]["train_loss"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale", [0, -100, "100", True])
def test_a_metric_scale_that_is_no_positive_number_is_refused(scale):
    with pytest.raises(ValueError, match=rf"metric_scale must be a number above 0 .*got {scale!r}"):
        bnguard.Guard(stale_model(), [], metric_scale=scale)


def test_bad_evaluation_values_and_a_missing_evaluate_are_named():
    guard = bnguard.Guard(stale_model(), [])
    with pytest.raises(TypeError, match="return a float or a dict of floats"):
        guard.evaluated("0.5")
    with pytest.raises(RuntimeError, match="pass evaluate= to bnguard.Guard"):
        guard.evaluate()
    with pytest.raises(bnguard.HookError, match="pass evaluate= to bnguard.Guard"):
        bnguard.Guard(stale_model()).step()


class EmaLikeTimm(torch.nn.Module):
    """Mirrors timm's ModelEmaV3: the wrapper stays in train mode, its copy is in eval mode for good and
    takes no gradients."""

    def __init__(self, model, decay=0.5):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for ema, current in zip(self.module.parameters(), model.parameters()):
            ema.lerp_(current, 1 - self.decay)

    def forward(self, x):
        return self.module(x)


def train_epoch_with_ema(model, ema, optimizer, loader, guard):
    for images, labels in loader:
        outputs = model(images)
        F.cross_entropy(outputs, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        guard.step(outputs, labels)


def test_precise_bn_recalibrates_an_ema_copy_kept_in_eval_mode_at_the_first_evaluation():
    torch.manual_seed(0)
    model = tiny_resnet()
    ema = EmaLikeTimm(model)
    assert ema.training and not ema.module.training
    train_set = toy_data(48)
    train_loader = DataLoader(train_set, batch_size=8, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    eval_images, eval_labels = toy_data(32, seed=1).tensors
    evaluate = lambda: {"acc": (ema(eval_images).argmax(1) == eval_labels).double().mean().item()}  # noqa: E731
    guard = bnguard.Guard(model, [bnguard.PreciseBN(target=ema)], evaluate=evaluate, train_loader=train_loader)
    train_epoch_with_ema(model, ema, optimizer, train_loader, guard)
    expected, copied = copy.deepcopy(ema.module), buffers_of(ema.module)
    guard.evaluate()
    assert guard.records[0]["recalibrated"] is True and guard.records[0]["recal_samples"] == 48
    guard.batches.draws -= 1  # the same draw again, for the reference
    bnguard.recalibrate(expected, list(guard.batches()), progress=False)
    assert_same_tensors(buffers_of(expected), buffers_of(ema.module))
    assert not torch.equal(copied["1.running_mean"], ema.module.get_buffer("1.running_mean"))


def ema_run(hook, epochs=2, **guard_kwargs):
    """A trained model with stale statistics and an EMA copy of it, both evaluated (the trained model's
    accuracy and loss, the copy's accuracy); ``hook`` watches."""
    model = stale_model(dropout=0.0)
    ema = EmaLikeTimm(model)
    hook.target = ema
    train_loader = DataLoader(toy_data(48), batch_size=8, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    images, labels = toy_data(32, seed=1).tensors

    def evaluate():
        with torch.no_grad():
            was, _ = model.training, model.eval()
            scores = {"acc": (model(images).argmax(1) == labels).double().mean().item(),
                      "loss": F.cross_entropy(model(images), labels).item(),
                      "ema_acc": (ema(images).argmax(1) == labels).double().mean().item()}
            model.train(was)
        return scores

    guard = bnguard.Guard(model, [hook], evaluate=evaluate, train_loader=train_loader, **guard_kwargs)
    for _ in range(epochs):
        train_epoch_with_ema(model, ema, optimizer, train_loader, guard)
        guard.evaluated(evaluate())
    return guard.records


def unprepared_batches():
    """Training batches prepared unlike training (inputs x0.1): statistics estimated from them are wrong."""
    images, labels = toy_data(48).tensors
    return [(images[i:i + 8] / 10, labels[i:i + 8]) for i in range(0, 48, 8)]


def test_precise_bn_on_an_ema_copy_checks_its_first_recalibration_on_a_metric_of_the_copy():
    with pytest.warns(UserWarning, match=r"first recalibration made eval_ema_acc worse .* not prepared like"):
        records = ema_run(bnguard.PreciseBN(), recalibration_loader=unprepared_batches())
    first, second = records
    assert not first["recalibrated"] and first["reason"].startswith("recalibration made eval_ema_acc worse")
    assert second["recalibrated"]  # checked once only
    kept = ema_run(bnguard.PreciseBN())  # prepared like training: kept
    assert [r["recalibrated"] for r in kept] == [True, True]


def test_precise_bn_on_an_ema_copy_judged_by_the_trained_models_metric_says_so():
    with pytest.warns(UserWarning, match=r"PreciseBN\(target=...\) recalibrated EmaLikeTimm, and eval_loss did not "
                                         r"move at all: it measures another model, .* monitor='ema_loss'"):
        records = ema_run(bnguard.PreciseBN(monitor="loss"), recalibration_loader=unprepared_batches())
    assert records[0]["recalibrated"]  # not checked, and said


def test_auto_recalibrate_on_an_ema_copy_watches_the_copys_metric_against_the_trained_models():
    records = ema_run(bnguard.AutoRecalibrate(monitor="ema_acc", train_monitor="acc"))
    first = records[0]
    assert first["recalibrated"] and first["diagnosis"] == bnguard.Verdict.STALE
    assert first["eval_ema_acc"] > first["eval_ema_acc_before_recal"]


def test_auto_recalibrate_on_an_ema_copy_judged_by_the_trained_models_metric_says_so():
    with pytest.warns(UserWarning, match=r"eval_acc did not move at all: it measures another model, .* "
                                         r"monitor='ema_acc'"):
        records = ema_run(bnguard.AutoRecalibrate())
    assert records[0]["recalibrated"] and records[0]["eval_acc"] == records[0]["eval_acc_before_recal"]


def test_a_target_whose_layers_are_all_frozen_says_so_once_and_charts_survive(recwarn):
    torch.manual_seed(0)
    model = tiny_resnet()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()  # frozen the fine-tuning way in the trained model
    ema = EmaLikeTimm(model)
    logger, precise = bnguard.BNStatsLogger(), bnguard.PreciseBN(target=ema)
    data = DataLoader(toy_data(16), batch_size=8)
    guard = bnguard.Guard(model, [logger, precise], evaluate=lambda: {"acc": 0.5}, train_loader=data)
    images, labels = toy_data(8).tensors
    for _ in range(2):
        guard.step(model(images), labels)
        guard.evaluate()
    guard.end()
    said = [str(w.message) for w in recwarn if "PreciseBN recalibrated nothing" in str(w.message)]
    assert len(said) == 1 and "all 6 BatchNorm layers skipped (6 frozen" in said[0]
    assert [r["recalibrated"] for r in guard.records] == [False, False]
    assert guard.records[0]["reason"].startswith("nothing recalibrated: all 6 BatchNorm layers skipped")
    overview = Overview()
    overview.add_recalibration(3, bnguard.RecalibrationReport(layers=[bnguard.LayerReport("a", skipped="frozen")]))
    assert overview.staleness_figure() is None and overview.staleness_image() is None


def accelerate_loop(epochs, guarded, dropout=0.3):
    """An Accelerate loop (1 or 2 processes), with the Guard's calls when ``guarded``."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = stale_model(dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_loader = DataLoader(toy_data(48), batch_size=4, shuffle=True)
    eval_loader = DataLoader(toy_data(32, seed=1), batch_size=8)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    def evaluate():
        model.eval()
        with torch.no_grad():
            hits = torch.cat([accelerator.gather_for_metrics(model(x).argmax(1) == y) for x, y in eval_loader])
        model.train()
        return {"eval_acc": hits.double().mean().item()}

    guard = bnguard.Guard(model, evaluate=evaluate, train_loader=train_loader, accelerator=accelerator) \
        if guarded else None

    hand_counts = []
    for _ in range(epochs):
        model.train()
        counts = torch.zeros(2, dtype=torch.float64)
        for images, labels in train_loader:
            outputs = model(images)
            accelerator.backward(F.cross_entropy(outputs, labels))
            optimizer.step()
            optimizer.zero_grad()
            counts += torch.tensor([(outputs.argmax(1) == labels).sum().item(), len(labels)], dtype=torch.float64)
            if guard is not None:
                guard.step(outputs, labels)
        hand = accelerator.reduce(counts, reduction="sum")
        hand_counts.append((hand[0] / hand[1]).item())
        metrics = evaluate()
        if guard is not None:
            metrics = guard.evaluated(metrics)
    if guard is not None:
        guard.end()
    return accelerator, model, guard, hand_counts


def test_accelerate_loop_counts_train_accuracy_and_keeps_training_bit_identical():
    _, bare, _, _ = accelerate_loop(3, guarded=False)
    _, model, guard, hand = accelerate_loop(3, guarded=True)
    assert_same_tensors(parameters_of(bare), parameters_of(model))
    assert [r["train_acc"] for r in guard.records] == pytest.approx(hand, abs=1e-12)
    assert sum(r["recalibrated"] for r in guard.records) >= 1  # at epoch 2; momentum 0 then keeps the statistics


def _guarded_accelerate_on_two_ranks(out_dir):
    accelerator, model, guard, hand = accelerate_loop(3, guarded=True)
    torch.save({"records": guard.records, "hand": hand, "buffers": buffers_of(model),
                "parameters": parameters_of(model)}, f"{out_dir}/rank{accelerator.process_index}.pt")


def _bare_accelerate_on_two_ranks(out_dir):
    accelerator, model, _, _ = accelerate_loop(3, guarded=False)
    torch.save(parameters_of(model), f"{out_dir}/bare{accelerator.process_index}.pt")


def test_accelerate_loop_on_two_processes(tmp_path):
    launch_two_processes(_guarded_accelerate_on_two_ranks, str(tmp_path))
    launch_two_processes(_bare_accelerate_on_two_ranks, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert_same_tensors(rank0["buffers"], rank1["buffers"])
    assert_same_tensors(rank0["parameters"], torch.load(tmp_path / "bare0.pt"))
    timing = ("recal_seconds",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(rank0["records"]) == strip(rank1["records"])
    assert [r["train_acc"] for r in rank0["records"]] == pytest.approx(rank0["hand"], abs=1e-12)
    recalibrated = [r for r in rank0["records"] if r["recalibrated"]]
    assert recalibrated and all(r["recal_samples"] == 48 for r in recalibrated)  # each sample once, both ranks


def test_training_batches_for_hooks_draw_on_a_stream_of_their_own():
    import random

    import numpy as np

    loader = DataLoader(toy_data(24), batch_size=4, shuffle=True)
    state = bnguard.HookRunner([], train_batches=lambda: loader).state

    def caller_draws(batches):
        """Iterates ``batches`` (if any), drawing from every global stream between items, as training would."""
        torch.manual_seed(5), random.seed(5), np.random.seed(5)
        drawn, labels = [], []
        for _, batch_labels in batches or [(None, None)] * 6:
            labels.append(batch_labels)
            drawn.append((torch.rand(1).item(), random.random(), np.random.rand()))
        return drawn, labels

    without, _ = caller_draws(None)
    with_batches, labels = caller_draws(state.train_batches())
    assert with_batches == without  # the caller's streams are untouched by the shuffle
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(labels, [y for _, y in loader]))  # the shuffle drew as usual


class DictModel(torch.nn.Module):
    """Hugging Face style: a dict batch as keyword arguments, a dict of logits and loss back."""

    def __init__(self):
        super().__init__()
        self.net = tiny_resnet()

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels) if labels is not None else None}


def test_dict_batches_and_dict_outputs():
    torch.manual_seed(0)
    model = DictModel()
    images, labels = toy_data(16).tensors
    batches = [{"pixel_values": images[i:i + 8], "labels": labels[i:i + 8]} for i in (0, 8)]
    guard = bnguard.Guard(model, [bnguard.PreciseBN()], evaluate=lambda: {"loss": 1.0},
                          recalibration_loader=batches)
    hits = []
    for batch in batches:
        outputs = model(**batch)
        outputs["loss"].backward()
        hits.append((outputs["logits"].argmax(1) == batch["labels"]).double())
        guard.step(outputs, batch=batch)  # loss, logits and targets found in the outputs and the batch
    expected = copy.deepcopy(model)
    bnguard.recalibrate(expected, batches, progress=False)
    guard.evaluate()
    assert_same_tensors(buffers_of(expected), buffers_of(model))
    assert guard.records[0]["train_acc"] == torch.cat(hits).mean().item()
    assert guard.records[0]["recal_samples"] == 16


def stale_training():
    """The stale model, its optimizer, a training loader and an evaluate function, as plain_loop has them."""
    model = stale_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    evaluate = evaluator(model, DataLoader(toy_data(32, seed=1), batch_size=8))
    return model, optimizer, DataLoader(toy_data(48), batch_size=8, shuffle=True), evaluate


def guarded_epoch(model, optimizer, loader, guard, after_step=None):
    """One epoch of optimizer steps, each followed by the guard's step call (and ``after_step()``)."""
    for images, labels in loader:
        loss = F.cross_entropy(outputs := model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        guard.step(outputs, labels, loss=loss)
        if after_step is not None:
            after_step()


def test_the_guard_logs_under_bnguard_and_never_over_the_scripts_own_metrics(tmp_path):
    from accelerate import Accelerator

    from bnguard.hooks.trackers import OWN_SECTIONS
    from wandb_log import history, offline_run_dir

    accelerator = Accelerator(cpu=True)
    bnguard.start_trackers(accelerator, "wandb", project="guard-keys", output_dir=tmp_path)
    model, optimizer, train_loader, evaluate = stale_training()
    guard = bnguard.Guard(model, evaluate=evaluate, train_loader=train_loader, accelerator=accelerator)
    mine, guards = {}, {}
    for epoch in range(4):
        guarded_epoch(model, optimizer, train_loader, guard,  # the script's own series, at the guard's steps
                      after_step=lambda: accelerator.log({"train_loss": 9.0 + epoch}, step=guard.state.step))
        accelerator.log({"eval_acc": 0.125, "epoch": 100 + epoch}, step=guard.state.step)  # e.g. an EMA's
        metrics = guard.evaluated(evaluate())
        mine[guard.state.step] = {"train_loss": 9.0 + epoch, "eval_acc": 0.125, "epoch": 100 + epoch}
        guards[guard.state.step] = {"bnguard/eval_acc": metrics["acc"], "bnguard/epoch": epoch,
                                    "bnguard/train_loss": guard.records[-1]["train_loss"]}
    guard.end()
    accelerator.end_training()
    assert sum(r["recalibrated"] for r in guard.records) >= 2  # the guard logged recalibrated values too
    rows = {row["_step"]: row for row in history(offline_run_dir(tmp_path))}
    for step in mine:
        assert {key: rows[step][key] for key in mine[step]} == mine[step]
        assert {key: rows[step][key] for key in guards[step]} == pytest.approx(guards[step])
    keys = {key.split("/_type")[0] for row in rows.values() for key in row if not key.startswith("_")}
    assert {key for key in keys if not key.startswith(OWN_SECTIONS)} == {"train_loss", "eval_acc", "epoch"}


def percent_run(evaluation_scale, metric_scale=None, **thresholds):
    """Four epochs of the stale model in a plain loop whose evaluation gives top1 times evaluation_scale."""
    model, optimizer, train_loader, evaluate = stale_training()
    guard = bnguard.Guard(model, [bnguard.AutoRecalibrate(monitor="top1", **thresholds)], metric_name="top1",
                          evaluate=lambda: {"top1": evaluation_scale * evaluate()["acc"]}, train_loader=train_loader,
                          metric_scale=metric_scale)
    for _ in range(4):
        guarded_epoch(model, optimizer, train_loader, guard)
        guard.evaluate()
    guard.end()
    return guard.records


@pytest.mark.parametrize("how", [{}, {"metric_scale": 100},
                                 {"gap_threshold": 5, "drop_threshold": 3, "recovery_margin": 1}])
def test_a_percent_evaluation_is_repaired_as_a_fraction_is(recwarn, how):
    fraction = percent_run(1)
    percent = percent_run(100, **how)
    decisions = lambda records: [(r["recalibrated"], r["diagnosis"]) for r in records]  # noqa: E731
    assert decisions(percent) == decisions(fraction)
    assert sum(r["recalibrated"] for r in percent) >= 2 and "stale statistics" in [r["diagnosis"] for r in percent]
    for in_percent, as_fraction in zip(percent, fraction):  # train top1 counted on the evaluation's scale
        for key in ("train_top1", "eval_top1", "eval_top1_before_recal"):
            assert in_percent[key] == pytest.approx(100 * as_fraction[key] if as_fraction[key] is not None else None)
    assert not recwarn.list


def test_the_default_logger_charts_the_metric_the_guard_is_given(recwarn):
    model = stale_model(dropout=0.0)
    evaluate = evaluator(model, DataLoader(toy_data(16, seed=1), batch_size=8))
    guard = bnguard.Guard(model, metric_name="top1", evaluate=lambda: {"top1": evaluate()["acc"]},
                          train_loader=DataLoader(toy_data(16), batch_size=8))
    logger, auto = guard.runner.hooks
    assert (logger.overview.metric, auto.monitor) == ("top1", "top1")
    images, labels = toy_data(8).tensors
    guard.step(outputs := model(images), labels, loss=F.cross_entropy(outputs, labels))
    metrics = guard.evaluate()
    guard.end()
    [row] = logger.overview.epochs
    assert row["eval"] == metrics["top1"] and row["train"] == guard.records[0]["train_top1"]
    assert not recwarn.list  # no "the at-a-glance accuracy chart stays empty"


@pytest.mark.gpu
def test_the_guards_step_never_waits_for_the_gpu():
    model = stale_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(toy_data(48), batch_size=8, shuffle=True)
    batches = [(images.cuda(), labels.cuda()) for images, labels in loader]
    guard = bnguard.Guard(model, [bnguard.BNStatsLogger(every_n_steps=100), bnguard.AutoRecalibrate()],
                          evaluate=evaluator(model, DataLoader(toy_data(16, seed=1), batch_size=8), "cuda"),
                          train_loader=loader)
    guarded_epoch(model, optimizer, batches[:1], guard)  # the first step describes the layers, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronization from here raises
    try:
        guarded_epoch(model, optimizer, batches[1:], guard)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.state.step == len(batches)
    guard.evaluate()
    assert guard.records[0]["step"] == len(batches)
