"""Resuming a Hugging Face Trainer with BNGuardCallback: whatever happened to the checkpoint, the Trainer
resumes, and the hooks continue from the state that belongs to the folder it resumes from."""

import shutil
import warnings

import pytest
import torch
import transformers

from bnguard import AutoRecalibrate, HookError
from bnguard.integrations.transformers import BNGuardCallback
from bnguard.integrations.transformers_state import STATE_FILE
from helpers import assert_same_tensors, parameters_of, without_timings
from hf_setup import tiny_resnet, trainer

LOSS = dict(monitor="loss", higher_is_better=False)


class StopAt(transformers.TrainerCallback):
    """Stops training after ``step`` steps, as a kill right after that step's checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def run(folder, callbacks=(), resume=None, **settings):
    callback = BNGuardCallback([AutoRecalibrate(**LOSS)])
    settings = {"epochs": 4, "save_strategy": "epoch", "lr_scheduler_type": "constant", **settings}
    fit = trainer(folder, [callback, *callbacks], model=tiny_resnet(bn_momentum=0.0), **settings)
    fit.train(resume_from_checkpoint=resume)
    return callback, fit


def decisions(callback):
    return [(d["reason"], d["recalibrated"]) for d in callback.hooks[0].history]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return run(tmp_path_factory.mktemp("whole"))


def test_records_name_whole_epochs_and_the_final_checkpoint_holds_the_last_one(whole, tmp_path):
    callback, fit = whole
    assert [r["epoch"] for r in callback.records] == [1, 2, 3, 4]
    assert all(isinstance(r["eval_loss"], float) for r in callback.records)
    saved = torch.load(f"{fit.args.output_dir}/checkpoint-16/{STATE_FILE}", weights_only=True)
    assert without_timings(saved["records"]) == without_timings(callback.records)


def test_a_kill_between_the_trainers_checkpoint_and_bnguards_file_still_resumes(whole, tmp_path):
    run(tmp_path, [StopAt(12)])
    (tmp_path / "checkpoint-12" / STATE_FILE).unlink()  # the kill came before on_save
    with pytest.warns(UserWarning, match=r"checkpoint-12/bnguard_hooks.pt is missing.*continue from .*checkpoint-8"):
        resumed, fit = run(tmp_path, resume=str(tmp_path / "checkpoint-12"))
    assert_same_tensors(parameters_of(whole[1].model), parameters_of(fit.model))  # the Trainer resumed exactly
    assert [r["epoch"] for r in resumed.records] == [1, 2, 4]  # epoch 3's record was in the lost file


def test_hook_state_comes_from_the_folder_resumed_and_must_belong_to_it(whole, tmp_path):
    run(tmp_path / "run", [StopAt(8)])
    moved = tmp_path / "elsewhere" / "checkpoint-8"
    shutil.copytree(tmp_path / "run" / "checkpoint-8", moved)
    shutil.rmtree(tmp_path / "run" / "checkpoint-8")
    other, _ = run(tmp_path / "other", [StopAt(8)], epochs=4, learning_rate=0.01)  # a same-named foreign folder
    shutil.copytree(tmp_path / "other" / "checkpoint-8", tmp_path / "run" / "checkpoint-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right folder, found without a word
        resumed, _ = run(tmp_path / "run", resume=str(moved))
    assert without_timings(resumed.records) == without_timings(whole[0].records)
    assert decisions(resumed) == decisions(whole[0])
    shutil.copy(tmp_path / "other" / "checkpoint-8" / STATE_FILE, moved / STATE_FILE)  # a foreign file
    with pytest.warns(UserWarning, match="belongs to another checkpoint"):
        run(tmp_path / "run", resume=str(moved))


def test_a_damaged_hook_state_file_is_named_and_the_run_resumes(tmp_path):
    run(tmp_path, [StopAt(8)])
    path = tmp_path / "checkpoint-8" / STATE_FILE
    path.write_bytes(path.read_bytes()[:200])
    with pytest.warns(UserWarning) as said:
        run(tmp_path, resume=str(tmp_path / "checkpoint-8"))
    (message,) = [str(w.message) for w in said if STATE_FILE in str(w.message)]
    assert "is damaged and cannot be read" in message and "weights_only" not in message
    assert "continue from" in message and "checkpoint-4" in message


def test_resuming_between_two_evaluations_takes_the_same_decisions(tmp_path):
    between = dict(eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=2, logging_strategy="steps",
                   logging_steps=1)
    whole, whole_fit = run(tmp_path / "whole", **between)
    run(tmp_path / "part", [StopAt(6)], **between)  # killed half-way between the evaluations at 4 and 8
    resumed, resumed_fit = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-6"), **between)
    assert decisions(resumed) == decisions(whole)
    assert without_timings(resumed.records) == without_timings(whole.records)
    final = [[e["eval_loss"] for e in fit.state.log_history if "eval_loss" in e][-1]
             for fit in (whole_fit, resumed_fit)]
    assert final[0] == final[1]


def test_without_an_eval_dataset_the_default_hooks_say_what_to_give(tmp_path):
    setup = trainer(tmp_path, [], eval_strategy="no")
    fit = transformers.Trainer(model=tiny_resnet(), args=setup.args, train_dataset=setup.train_dataset,
                               callbacks=[BNGuardCallback()])
    with pytest.raises(HookError, match="AutoRecalibrate needs evaluation: give the Trainer an eval_dataset"), \
            pytest.warns(UserWarning, match="AutoRecalibrate will never run: the Trainer never evaluates"):
        fit.train()


def test_a_trainer_that_never_evaluates_is_said_at_fit_start(tmp_path):
    with pytest.warns(UserWarning, match=r"AutoRecalibrate will never run: the Trainer never evaluates"):
        run(tmp_path, epochs=1, eval_strategy="no")
