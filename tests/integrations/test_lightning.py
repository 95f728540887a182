"""The Lightning adapter in real Lightning Trainers on CPU: loggers read back, checkpoints, resume, DDP."""

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnguard import AutoRecalibrate, BNStatsLogger, Hook, PreciseBN, TrainingBatches, Verdict, recalibrate
from bnguard.integrations.lightning import BNGuardCallback
from helpers import (
    SUPPORT,
    assert_same_tensors,
    assert_two_ranks_agree,
    buffers_of,
    parameters_of,
    reevaluating_hook,
    support_env,
    without_timings,
)
from lightning_setup import Classifier, loaders, memorizing_loaders, trainer
from wandb_log import history, offline_run_dir

# Lightning's advice for the tiny runs here (few batches per epoch), and its notice for the resumed runs
# that write into their own checkpoint folder again, as resuming means to.
pytestmark = [pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging"),
              pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")]


def bn_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


class SeenByLaterCallbacks(Callback):
    """What a callback after bnguard's (as ModelCheckpoint and EarlyStopping are) reads at validation end."""

    def __init__(self):
        self.val_acc = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val_acc"]))


def test_histograms_of_every_batchnorm_layer_reach_wandb_and_tensorboard(tmp_path):
    model = Classifier()
    loggers = [WandbLogger(save_dir=str(tmp_path), offline=True), TensorBoardLogger(str(tmp_path), name="tb")]
    fit = trainer(tmp_path, [BNGuardCallback([BNStatsLogger(every_n_steps=2, on_eval=False)])], epochs=2,
                  logger=loggers)
    fit.fit(model, *loaders())
    loggers[0].experiment.finish()
    rows = history(offline_run_dir(tmp_path))
    names = bn_names(model)
    assert len(names) == 17  # the question's 17 BatchNorm layers
    for name in names:
        for tensor in ("running_mean", "running_var"):
            logged = [r for r in rows if f"bn/{name}/{tensor}/_type" in r]
            assert [r["trainer/global_step"] for r in logged] == [2, 4, 6, 8]
            assert all(r[f"bn/{name}/{tensor}/_type"] == "histogram" for r in logged)
            assert sum(logged[-1][f"bn/{name}/{tensor}/values"]) == getattr(model.net.get_submodule(
                name.removeprefix("net.")), tensor).numel()
    assert any("bn/layers/_type" in r for r in rows)  # the layer table
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"histograms": 0})  # keep every step
    events.Reload()
    for name in names:
        steps = [e.step for e in events.Histograms(f"bn/{name}/running_var")]
        assert steps == [2, 4, 6, 8]
        assert events.Histograms(f"bn/{name}/running_var")[-1].histogram_value.num == len(
            model.net.get_submodule(name.removeprefix("net.")).running_var)


def test_stale_statistics_are_recalibrated_and_the_checkpoint_keeps_the_recalibrated_score(tmp_path):
    torch.manual_seed(0)
    model = Classifier(bn_momentum=0.0)  # running statistics never move from 0 / 1: stale once weights learn
    guard = AutoRecalibrate()
    callback, seen = BNGuardCallback([guard]), SeenByLaterCallbacks()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    fit = trainer(tmp_path, [callback, seen, best], epochs=3, logger=logger)
    fit.fit(model, *loaders())
    logger.experiment.finish()
    records = callback.records
    recalibrated = [r for r in records if r["recalibrated"]]
    assert recalibrated and all(r["diagnosis"] == Verdict.STALE for r in recalibrated)
    assert all(r["eval_acc"] > r["eval_acc_before_recal"] for r in recalibrated)
    as_logged = [torch.tensor(r["eval_acc"], dtype=torch.float32).item() for r in records]  # Lightning's float32
    assert seen.val_acc == as_logged  # later callbacks read the recalibrated value
    assert float(best.best_model_score) == max(as_logged)
    logged = [r["val_acc"] for r in history(offline_run_dir(tmp_path)) if "val_acc" in r]
    assert logged == pytest.approx([r["eval_acc"] for r in records])  # the stale values were never logged
    before = [r["bnguard/eval_acc_before_recal"] for r in history(offline_run_dir(tmp_path))
              if "bnguard/eval_acc_before_recal" in r]
    assert before == [r["eval_acc_before_recal"] for r in recalibrated]


def test_the_re_evaluation_measures_what_lightning_measured(tmp_path):
    class Remeasure(Hook):
        def on_eval_end(self, state):
            self.pairs = getattr(self, "pairs", []) + [(dict(state.eval_metrics), state.evaluate())]

    hook = Remeasure()
    trainer(tmp_path, [BNGuardCallback([hook])], epochs=2).fit(Classifier(), *loaders(n_eval=13, batch_size=4))
    for measured, again in hook.pairs:  # batches of 4, 4, 4 and 1: weighted as Lightning weights them
        assert again.keys() == measured.keys() == {"eval_acc", "eval_loss"}
        assert again == pytest.approx(measured, rel=1e-6)


def test_precise_bn_recalibrates_before_each_validation_exactly(tmp_path):
    class Snapshot(Callback):  # after bnguard's EVAL_START, before any validation batch
        def on_validation_start(self, trainer, pl_module):
            self.buffers = buffers_of(pl_module)

    snapshot = Snapshot()
    train, evaluation = loaders(n_train=32, batch_size=8)
    model = Classifier()
    trainer(tmp_path, [BNGuardCallback([PreciseBN(num_samples=32)]), snapshot], epochs=1).fit(model, train, evaluation)
    reference = Classifier()
    reference.load_state_dict(model.state_dict())
    recalibrate(reference, TrainingBatches(train)(), num_samples=32, progress=False)  # the batches it draws
    assert_same_tensors(snapshot.buffers, buffers_of(reference))


def test_genuine_overfitting_is_not_recalibrated_at_every_evaluation(tmp_path):
    # Only the head learns, from fixed features whose statistics are exact after one full batch (cumulative
    # average): the head memorizes random labels, and recalibrating can explain none of the gap.
    torch.manual_seed(0)
    model = Classifier(bn_momentum=None, width=8, lr=0.1)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("net.head")
    callback = BNGuardCallback([AutoRecalibrate()])
    trainer(tmp_path, [callback], epochs=10).fit(model, *memorizing_loaders())
    records = callback.records
    assert records[-1]["train_acc"] == 1.0 and records[-1]["eval_acc"] < 0.5  # memorized, not learned
    assert [r["epoch"] for r in records if r["recalibrated"]] == [2, 4, 7]  # backing off 1, 2, then 4
    assert all(r["diagnosis"] == Verdict.UNEXPLAINED for r in records if r["recalibrated"])


def test_a_resumed_fit_continues_the_hooks_decisions(tmp_path):
    def run(folder, epochs, ckpt_path=None):
        torch.manual_seed(0)
        callback = BNGuardCallback([AutoRecalibrate()])
        saver = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1)
        # Lightning does not checkpoint the global random state that shuffles: a fixed order here
        trainer(folder, [callback, saver], epochs=epochs).fit(Classifier(bn_momentum=0.0), *loaders(shuffle=False),
                                                               ckpt_path=ckpt_path)
        return callback

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "part", 2)
    (checkpoint,) = (tmp_path / "part").glob("epoch=1-*.ckpt")
    resumed = run(tmp_path / "part", 4, ckpt_path=str(checkpoint))

    assert any(r["diagnosis"] is not None for r in whole.records[2:])  # the resumed half has decisions to agree on
    assert without_timings(resumed.records) == without_timings(whole.records)
    assert [h["reason"] for h in resumed.hooks[0].history] == [h["reason"] for h in whole.hooks[0].history]


def test_two_ddp_processes_agree_bit_for_bit_and_only_rank_zero_logs(tmp_path):
    script = SUPPORT / "lightning_two_processes.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=SUPPORT, timeout=300, env=support_env(),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "could not summarize" not in run.stderr  # the layer table saw the model's own first input
    assert_two_ranks_agree(tmp_path, samples=64)  # each rank recalibrates on its own 32


def test_several_training_loaders_need_a_recalibration_loader(tmp_path):
    train, evaluation = loaders()
    fit = trainer(tmp_path, [BNGuardCallback([PreciseBN()])], epochs=1)

    class TwoLoaders(Classifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["a"], batch_idx)

    with pytest.raises(TypeError, match="recalibration_loader="):
        fit.fit(TwoLoaders(), {"a": train, "b": train}, evaluation)
    precise = PreciseBN(num_samples=8)
    given = trainer(tmp_path, [BNGuardCallback([precise], recalibration_loader=train)], epochs=1)
    given.fit(TwoLoaders(), {"a": train, "b": train}, evaluation)  # with one given, it recalibrates from it
    assert precise.evaluations == 1


def test_hooks_are_checked_where_the_callback_is_built():
    with pytest.raises(TypeError, match="subclass bnguard.Hook"):
        BNGuardCallback([object()])


def test_a_missing_lightning_names_the_extra():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "import bnguard.integrations.lightning")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "pip install 'bnguard[lightning]'" in result.stderr


def test_the_hooks_leave_training_bit_identical(tmp_path):
    def trained(hooks):
        torch.manual_seed(0)
        model = Classifier(bn_momentum=0.0)
        trainer(tmp_path, [BNGuardCallback(hooks)], epochs=3).fit(model, *loaders())
        return parameters_of(model)

    guarded = trained([BNStatsLogger(every_n_steps=1), AutoRecalibrate(), PreciseBN(), reevaluating_hook()])
    assert_same_tensors(trained([]), guarded)


def test_relaunching_a_finished_run_from_last_keeps_the_hook_state_and_records(tmp_path):
    def run(ckpt_path=None):
        torch.manual_seed(0)
        callback = BNGuardCallback([AutoRecalibrate()])
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer(tmp_path, [callback, saver], epochs=2).fit(Classifier(bn_momentum=0.0), *loaders(), ckpt_path=ckpt_path)
        return callback

    first = run()
    again = run(ckpt_path="last")  # the run is complete: Lightning trains nothing, the callback keeps its state
    assert len(again.records) == 2 and without_timings(again.records) == without_timings(first.records)
    assert again.state_dict()["records"] == first.state_dict()["records"]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert any(state.get("records") for state in saved["callbacks"].values())


def test_a_module_without_validation_step_is_said_at_fit_start(tmp_path):
    class NoValidation(Classifier):
        validation_step = pl.LightningModule.validation_step

    with pytest.warns(UserWarning, match=r"AutoRecalibrate, PreciseBN will never run: the LightningModule has no "
                                         r"validation_step"):
        trainer(tmp_path, [BNGuardCallback([AutoRecalibrate(report_only=True), PreciseBN()])], epochs=1,
                limit_val_batches=0).fit(NoValidation(), loaders()[0])


class LogsMetricObjects(Classifier):
    """Logs its validation accuracy as a torchmetrics object, as Lightning's own examples do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val_acc", self.val_accuracy)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))


def test_torchmetrics_objects_are_refused_at_the_first_validation_before_any_recalibration(tmp_path):
    torch.manual_seed(0)
    model = LogsMetricObjects(bn_momentum=0.0)
    callback = BNGuardCallback([AutoRecalibrate()])
    statistics = lambda: {k: v for k, v in buffers_of(model).items() if "running" in k}  # noqa: E731
    before = statistics()
    with pytest.raises(ValueError, match=r"^AutoRecalibrate evaluates again after a recalibration, and the "
                                         r"LightningModule logs 'val_acc' as torchmetrics object\(s\), .* log the "
                                         r"value instead"):
        trainer(tmp_path, [callback], epochs=2).fit(model, *loaders())
    assert_same_tensors(statistics(), before)  # momentum 0: only a recalibration could have changed them
    assert callback.records == [] and "log" not in vars(model)
    model.train()  # the refused fit stopped in validation, in eval mode
    trainer(tmp_path, [BNGuardCallback([BNStatsLogger(every_n_steps=2)])], epochs=1).fit(model, *loaders())


def test_torchmetrics_objects_leave_precise_bn_running_with_its_check_off(tmp_path):
    torch.manual_seed(0)
    model = LogsMetricObjects(bn_momentum=0.0)
    callback = BNGuardCallback([PreciseBN()])
    before = {k: v for k, v in buffers_of(model).items() if "running" in k}
    with pytest.warns(UserWarning, match=r"PreciseBN left its first recalibration unchecked: the check evaluates "
                                         r"again, and the LightningModule logs 'val_acc' as torchmetrics"):
        trainer(tmp_path, [callback], epochs=2).fit(model, *loaders())
    assert [r["recalibrated"] for r in callback.records] == [True, True]
    assert not torch.equal(before["net.stem.1.running_var"], model.get_buffer("net.stem.1.running_var"))


def test_torchmetrics_objects_refuse_only_the_hook_that_needs_them_before_any_recalibration_is_kept(tmp_path):
    torch.manual_seed(0)
    model = LogsMetricObjects(bn_momentum=0.0)
    before = {k: v for k, v in buffers_of(model).items() if "running" in k}
    callback = BNGuardCallback([PreciseBN(), AutoRecalibrate()])
    with pytest.raises(ValueError, match=r"^AutoRecalibrate evaluates again .* or leave AutoRecalibrate out\. The "
                                         r"statistics are as they were before this validation\.$"):
        trainer(tmp_path, [callback], epochs=2).fit(model, *loaders())
    assert_same_tensors({k: v for k, v in buffers_of(model).items() if "running" in k}, before)


class ShowsAccuracyInTheBar(Classifier):
    def validation_step(self, batch, batch_idx):
        loss, acc = self._step(batch, "val")
        self.log("val_acc", acc, prog_bar=True)
        self.log("val_loss", loss)


def test_the_progress_bar_shows_the_recalibrated_value(tmp_path):
    torch.manual_seed(0)
    callback = BNGuardCallback([AutoRecalibrate()])
    fit = trainer(tmp_path, [callback], epochs=2)
    fit.fit(ShowsAccuracyInTheBar(bn_momentum=0.0), *loaders())
    last = callback.records[-1]
    assert last["recalibrated"] and last["eval_acc"] != last["eval_acc_before_recal"]
    assert float(fit.progress_bar_metrics["val_acc"]) == torch.tensor(last["eval_acc"]).float().item()
