import json
import random
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import bnguard
from bnguard import Event, Hook
from bnguard.drivers.checkpoint import latest_checkpoint
from bnguard.drivers.metrics import MetricSums
from helpers import ON_EACH_DEVICE, assert_same_tensors, parameters_of, reevaluating_hook, toy_loop


class Recorder(Hook):
    """Records (event, epoch, step) for every event."""

    def __init__(self):
        self.seen = []
        for event in Event:
            setattr(self, event.value, self._recorder(event))

    def _recorder(self, event):
        return lambda state: self.seen.append((event.value, state.epoch, state.step))


def expected_events(epochs, steps_per_epoch, evaluate=True):
    out, step = [("on_fit_start", 0, 0)], 0
    for epoch in range(epochs):
        out.append(("on_epoch_start", epoch, step))
        for _ in range(steps_per_epoch):
            step += 1
            out.append(("on_step_end", epoch, step))
        out.append(("on_train_epoch_end", epoch, step))
        if evaluate:
            out += [("on_eval_start", epoch, step), ("on_eval_end", epoch, step)]
        out.append(("on_epoch_end", epoch, step))
    return out + [("on_fit_end", epochs - 1, step)]


def test_every_hook_method_is_exactly_one_event():
    methods = {name for name in vars(Hook) if name.startswith("on_")}
    assert methods == {event.value for event in Event}
    assert len({event.value for event in Event}) == len(Event)


@pytest.mark.parametrize("accumulation, steps_per_epoch", [(1, 6), (2, 3), (4, 2)])
def test_event_order_matches_the_documented_loop(tmp_path, accumulation, steps_per_epoch):
    recorder = Recorder()
    toy_loop(tmp_path, hooks=[recorder], epochs=2, gradient_accumulation_steps=accumulation).fit()
    # 24 samples in batches of 4: 6 batches, so 6 / accumulation optimizer steps (the last group is flushed)
    assert recorder.seen == expected_events(2, steps_per_epoch)


def test_evaluation_every_n_steps_fires_inside_the_epoch(tmp_path):
    recorder = Recorder()
    toy_loop(tmp_path, hooks=[recorder], epochs=1, eval_every_steps=4).fit()
    names = [event for event, _, _ in recorder.seen]
    assert names == ["on_fit_start", "on_epoch_start", *["on_step_end"] * 4, "on_eval_start", "on_eval_end",
                     *["on_step_end"] * 2, "on_train_epoch_end", "on_epoch_end", "on_fit_end"]


def test_metrics_file_and_final_metrics(tmp_path):
    loop = toy_loop(tmp_path, epochs=3)
    final = loop.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and [r["step"] for r in records] == [6, 12, 18]
    assert final == records[-1]
    for r in records:
        assert {"train_loss", "train_acc", "eval_loss", "eval_acc", "seconds"} <= r.keys()
        assert 0 <= r["train_acc"] <= 1 and r["eval_acc"] * 10 == pytest.approx(round(r["eval_acc"] * 10))
    # eval metrics are those of the model as it ends: recompute them by hand
    model = loop.accelerator.unwrap_model(loop.model).eval()
    images, labels = loop.eval_loader.dataset.tensors
    with torch.no_grad():
        logits = model(images)
    assert final["eval_acc"] == pytest.approx((logits.argmax(1) == labels).double().mean().item(), abs=1e-12)
    assert final["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("progress", [True, False])
def test_each_epoch_is_echoed_with_or_without_a_progress_bar(tmp_path, capsys, monkeypatch, progress):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as in a terminal, where the bar is drawn
    toy_loop(tmp_path, epochs=2, progress=progress).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[:4] for line in lines] == [["epoch", "1", "step", "6"], ["epoch", "2", "step", "12"]]
    assert all(" eval_acc " in line for line in lines)


def test_custom_metric_replaces_accuracy(tmp_path):
    final = toy_loop(tmp_path, epochs=1, metric=lambda out, y: (out.argmax(1) != y).double(),
                     metric_name="error").fit()
    assert "train_error" in final and "eval_error" in final and "eval_acc" not in final


def test_a_hook_can_stop_the_loop_and_max_steps_stops_it(tmp_path):
    class StopAt(Hook):
        def on_step_end(self, state):
            if state.step == 4:
                state.request_stop()

    assert toy_loop(tmp_path / "a", hooks=[StopAt()], epochs=5).fit()["step"] == 4
    assert toy_loop(tmp_path / "b", epochs=None, max_steps=8).fit()["step"] == 8


@ON_EACH_DEVICE
def test_resume_equals_uninterrupted(tmp_path, capsys, device):
    whole = toy_loop(tmp_path / "whole", epochs=3, dropout=0.3, checkpoint_every_epochs=1)
    assert whole.accelerator.device.type == device
    whole.fit()

    class Interrupt(Hook):
        def on_epoch_start(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    broken = toy_loop(tmp_path / "resumed", hooks=[Interrupt()], epochs=3, dropout=0.3, checkpoint_every_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    torch.manual_seed(1234)  # a different process state: the checkpoint must restore everything
    resumed = toy_loop(tmp_path / "resumed", epochs=3, dropout=0.3, checkpoint_every_epochs=1)
    resumed.fit(resume_from="latest")
    checkpoint = tmp_path / "resumed" / "checkpoints" / "epoch-0001"
    assert f"bnguard: resumed from {checkpoint} (1 epoch(s) done, step 6)" in capsys.readouterr().out

    def read(path):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert read(tmp_path / "resumed") == read(tmp_path / "whole")
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [
        "epoch-0001", "epoch-0002", "epoch-0003"]


def test_hook_state_is_checkpointed_under_distinct_keys(tmp_path):
    class Counter(Hook):
        def __init__(self):
            self.calls = 0

        def on_step_end(self, state):
            self.calls += 1

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    first, second = Counter(), Counter()
    second.calls = 100
    toy_loop(tmp_path, hooks=[first, second], epochs=1, checkpoint_every_epochs=1).fit()
    counter = "test_hook_state_is_checkpointed_under_distinct_keys.<locals>.Counter"
    assert (first.state_key, second.state_key) == (f"{counter}#0", f"{counter}#1")
    restored = [Counter(), Counter()]
    toy_loop(tmp_path, hooks=restored, epochs=1).fit(resume_from=tmp_path / "checkpoints" / "epoch-0001")
    assert [h.calls for h in restored] == [6, 106]


def test_an_interrupted_save_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    loop = toy_loop(tmp_path, epochs=2, checkpoint_every_epochs=1)

    real_save = loop.accelerator.save_state
    calls = []

    def failing_second_save(path):
        calls.append(path)
        real_save(path)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(loop.accelerator, "save_state", failing_second_save)
    with pytest.raises(OSError):
        loop.fit()
    good = tmp_path / "checkpoints" / "epoch-0001"
    assert good.is_dir() and not (tmp_path / "checkpoints" / "epoch-0002").exists()
    assert latest_checkpoint(tmp_path / "checkpoints") == good


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"n_train": 0}, ValueError, "train_loader is empty"),
        ({"n_eval": 0, "eval_every_epochs": 1}, ValueError, "no eval_loader"),
        ({"hooks": [object()]}, TypeError, "bnguard.Hook"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
        ({"epochs": None}, ValueError, "give epochs or max_steps"),
        ({"tracker": "comet_ml"}, ValueError, "unknown tracker 'comet_ml': choose from wandb, tensorboard, mlflow"),
    ],
)
def test_bad_input_fails_at_construction(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        toy_loop(tmp_path, **kwargs)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_failing_hook_fires_the_exception_event_and_names_itself(tmp_path):
    class Broken(Hook):
        def on_train_epoch_end(self, state):
            raise ZeroDivisionError("oops")

    class Witness(Hook):
        error = None

        def on_exception(self, state):
            Witness.error = state.error

    with pytest.raises(bnguard.HookError, match="Broken failed in on_train_epoch_end") as caught:
        toy_loop(tmp_path, hooks=[Broken(), Witness()]).fit()
    assert Witness.error is caught.value and isinstance(caught.value.__cause__, ZeroDivisionError)


@ON_EACH_DEVICE
def test_training_batches_for_hooks_leave_the_run_unchanged(tmp_path, device):
    plain = toy_loop(tmp_path / "plain", epochs=2, dropout=0.3).fit()

    class DrawOnly(Hook):
        def on_epoch_end(self, state):
            self.sizes = [len(batch[0]) for batch in state.train_batches()]

    drawer = DrawOnly()
    drawn = toy_loop(tmp_path / "drawn", hooks=[drawer], epochs=2, dropout=0.3).fit()
    assert drawer.sizes == [4] * 6
    assert {k: v for k, v in drawn.items() if k != "seconds"} == {k: v for k, v in plain.items() if k != "seconds"}


def test_an_empty_eval_loader_is_an_error_not_a_zero_score(tmp_path):
    from torch.utils.data import DataLoader

    from helpers import tiny_resnet, toy_data

    model = tiny_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train = DataLoader(toy_data(8), batch_size=4)
    with pytest.raises(ValueError, match="eval_loader is empty"):
        bnguard.Loop(model, optimizer, train, eval_loader=DataLoader(toy_data(0), batch_size=4), epochs=1,
                     output_dir=tmp_path, progress=False)

    with pytest.raises(ValueError, match="no eval sample was seen"):  # data without a length, found empty later
        MetricSums("cpu").compute("eval", "acc")
    assert not (tmp_path / "metrics.jsonl").exists()


def always_recalibrating():
    return bnguard.AutoRecalibrate(gap_threshold=-1.0)  # every evaluation triggers: every draw matters


def plain_records(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "recal_seconds")}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_the_logger_changes_nothing_in_the_run(tmp_path):
    toy_loop(tmp_path / "without", hooks=[always_recalibrating()], epochs=3, dropout=0.3).fit()
    logged = toy_loop(tmp_path / "with", hooks=[bnguard.BNStatsLogger(every_n_steps=2), always_recalibrating()],
                      epochs=3, dropout=0.3)
    logged.fit()
    assert plain_records(tmp_path / "with") == plain_records(tmp_path / "without")


@ON_EACH_DEVICE
def test_resume_is_bit_identical_with_every_hook_on(tmp_path, device):
    def loop(path, extra=()):
        return toy_loop(path, hooks=[bnguard.BNStatsLogger(every_n_steps=2), always_recalibrating(), *extra],
                        epochs=4, dropout=0.3, checkpoint_every_epochs=1, tracker="tensorboard")

    whole = loop(tmp_path / "whole")
    assert whole.accelerator.device.type == device
    whole.fit()
    kept = [r["step"] for r in plain_records(tmp_path / "whole") if r["recalibrated"]]
    assert len(whole.runner.hooks[0].overview.epochs) == 4 and kept
    assert [step for step, _ in whole.runner.hooks[0].overview.recalibrations] == kept

    class Interrupt(Hook):
        def on_epoch_start(self, state):
            if state.epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop(tmp_path / "resumed", [Interrupt()]).fit()
    torch.manual_seed(99)
    resumed = loop(tmp_path / "resumed")
    resumed.fit(resume_from="latest")
    assert plain_records(tmp_path / "resumed") == plain_records(tmp_path / "whole")
    assert [r["recal_samples"] > 0 for r in plain_records(tmp_path / "whole")] == [True, False, True, False]
    # the overview's charts hold the whole history
    overview, uninterrupted = resumed.runner.hooks[0].overview, whole.runner.hooks[0].overview
    assert overview.epochs == uninterrupted.epochs and overview.layer_values == uninterrupted.layer_values
    assert [step for step, _ in overview.recalibrations] == [step for step, _ in uninterrupted.recalibrations]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


@ON_EACH_DEVICE
def test_a_hooks_reevaluation_leaves_training_with_dropout_bit_identical(tmp_path, device):
    bare = toy_loop(tmp_path / "bare", epochs=3, dropout=0.5)
    assert bare.accelerator.device.type == device
    bare.fit()
    guarded = toy_loop(tmp_path / "guarded", hooks=[reevaluating_hook()], epochs=3, dropout=0.5)
    guarded.fit()
    assert_same_tensors(parameters_of(bare.model), parameters_of(guarded.model))


@ON_EACH_DEVICE
def test_bf16_training_is_bit_identical_with_the_statistics_recalibrated_at_every_evaluation(tmp_path, device):
    def fit(path, hooks):
        loop = toy_loop(path, hooks=hooks, epochs=3, dropout=0.3, accelerator=Accelerator(mixed_precision="bf16"))
        assert loop.accelerator.device.type == device
        loop.fit()
        return loop

    bare = fit(tmp_path / "bare", [])
    guarded = fit(tmp_path / "guarded", [bnguard.BNStatsLogger(every_n_steps=2), bnguard.PreciseBN()])
    assert_same_tensors(parameters_of(bare.model), parameters_of(guarded.model))
    assert [r["recal_samples"] for r in plain_records(tmp_path / "guarded")] == [24] * 3


def random_states(device):
    """Every random state a hook could disturb: torch's (and CUDA's, on CUDA), Python's and NumPy's."""
    cuda = torch.cuda.get_rng_state() if device == "cuda" else torch.zeros(0, dtype=torch.uint8)
    generator, keys, position, *gaussian = np.random.get_state()
    return torch.get_rng_state(), cuda, random.getstate(), (generator, keys.tolist(), position, *gaussian)


class RandomStateProbe(Hook):
    """Records the random states at every event the loop fires; fired between two hooks, it shows what the
    first one left. (A hook's own RECALIBRATED reaches the probes in the middle of that hook's work.)"""

    def __init__(self, device):
        self.seen = []
        for event in Event:
            if event is not Event.RECALIBRATED:
                setattr(self, event.value, lambda state, event=event: self.seen.append((event, random_states(device))))


@ON_EACH_DEVICE
@pytest.mark.parametrize("recalibrating", [always_recalibrating, bnguard.PreciseBN])
def test_no_hook_moves_a_random_state(tmp_path, device, recalibrating):
    hooks = [bnguard.BNStatsLogger(every_n_steps=1), recalibrating()]
    probes = [RandomStateProbe(device) for _ in range(len(hooks) + 1)]
    loop = toy_loop(tmp_path, hooks=[probes[0], hooks[0], probes[1], hooks[1], probes[2]], epochs=2, dropout=0.3)
    loop.fit()
    assert len(probes[0].seen) > 20 and plain_records(tmp_path)[0]["recal_samples"] == 24
    for before, after in zip(probes, probes[1:]):
        assert [event for event, _ in before.seen] == [event for event, _ in after.seen]
        for (event, old), (_, new) in zip(before.seen, after.seen):
            assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1]), event
            assert old[2:] == new[2:], event
