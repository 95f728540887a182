import re

import pytest
import torch

import bnguard
from bnguard import Event, Hook
from helpers import ON_EACH_DEVICE, launch_two_processes, tiny_resnet, toy_data
from wandb_log import history, offline_run_dir


class Log(Hook):
    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def on_step_end(self, state):
        self.seen.append((self.name, state.step))


def test_dispatcher_updates_state_then_calls_hooks_in_list_order():
    seen = []
    hooks = bnguard.HookRunner([Log("a", seen), Log("b", seen)])
    hooks.fire(Event.STEP_END, step=7)
    hooks.fire("on_step_end", step=8)
    assert seen == [("a", 7), ("b", 7), ("a", 8), ("b", 8)]
    with pytest.raises(AttributeError, match="no field 'stepp'"):
        hooks.fire(Event.STEP_END, stepp=1)
    with pytest.raises(ValueError):
        hooks.fire("on_nothing")


def test_state_helpers_say_what_is_missing():
    state = bnguard.HookRunner([]).state
    with pytest.raises(RuntimeError, match="evaluate="):
        state.evaluate()
    with pytest.raises(RuntimeError, match="train_batches="):
        state.train_batches()


def test_a_loader_given_as_batches_is_refused_when_the_runner_is_made():
    loader = torch.utils.data.DataLoader(toy_data(8), batch_size=4)
    with pytest.raises(TypeError, match=r"train_batches must be a callable .*, got DataLoader: pass "
                                        r"bnguard.TrainingBatches\(loader\)"):
        bnguard.HookRunner([bnguard.PreciseBN()], train_batches=loader)


def test_timms_prefetch_loader_is_refused_when_the_guard_is_made():
    from timm.data.loader import PrefetchLoader

    loader = PrefetchLoader(torch.utils.data.DataLoader(toy_data(8), batch_size=4), channels=1, mean=(0.0,),
                            std=(1.0,), device=torch.device("cpu"))
    with pytest.raises(TypeError, match="needs a torch DataLoader; got PrefetchLoader, .* pass recalibration_loader="):
        bnguard.Guard(tiny_resnet(), evaluate=lambda: 0.5, train_loader=loader)
    guard = bnguard.Guard(tiny_resnet(), evaluate=lambda: 0.5, train_loader=loader, recalibration_loader=loader)
    assert len(list(guard.state.train_batches())) == 2  # the prepared batches, as given


def test_own_loop_example_runs_the_hooks(tmp_path, capsys):
    from own_loop import main

    metrics = main(["--epochs", "2", "--limit-batches", "3", "--output-dir", str(tmp_path)])
    lines = re.findall(r"epoch (\d): train accuracy [0-9.]+, eval accuracy ([0-9.]+), recalibrated (True|False)",
                       capsys.readouterr().out)
    assert [epoch for epoch, _, _ in lines] == ["1", "2"]
    assert float(lines[-1][1]) == pytest.approx(metrics["eval_acc"], abs=5e-4)
    assert metrics["eval_acc"] * 450 == pytest.approx(round(metrics["eval_acc"] * 450))  # 450 eval digits
    rows = history(offline_run_dir(tmp_path))
    assert {r["_step"] for r in rows if r.get("bn/stem.1/running_var/_type") == "histogram"} >= {3, 6}


def _own_loop_on_two_ranks(out_dir: str):
    import torch
    from accelerate.state import PartialState

    from own_loop import main

    metrics = main(["--epochs", "2", "--limit-batches", "3", "--output-dir", out_dir])
    torch.save(metrics, f"{out_dir}/rank{PartialState().process_index}.pt")


def test_own_loop_example_on_two_processes(tmp_path):
    import torch

    launch_two_processes(_own_loop_on_two_ranks, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0 == rank1
    rows = history(offline_run_dir(tmp_path))  # one W&B run, written by the main process
    assert {r["_step"] for r in rows if r.get("bn/stem.1/running_var/_type") == "histogram"} >= {3}


def test_state_says_what_the_loop_gave_it():
    bare = bnguard.HookRunner([]).state
    assert not bare.has_evaluation and not bare.has_train_batches
    given = bnguard.HookRunner([], evaluate=lambda: {"eval_acc": 0.5}, train_batches=lambda: [[1]]).state
    assert given.has_evaluation and given.has_train_batches
    assert given.evaluate() == {"eval_acc": 0.5} and list(given.train_batches()) == [[1]]
    with pytest.raises(AttributeError, match="no field 'evaluate' to update"):
        bnguard.HookRunner([]).fire(Event.STEP_END, evaluate=None)


def test_state_checkpoints_where_the_run_is():
    runner = bnguard.HookRunner([])
    runner.fire(Event.EPOCH_START, epoch=3, step=120)
    restored = bnguard.HookRunner([]).state
    restored.load_state_dict(runner.state.state_dict())
    assert (restored.epoch, restored.step) == (3, 120)


@ON_EACH_DEVICE
def test_own_loop_example_resumes_from_its_checkpoint_as_if_never_interrupted(tmp_path, capsys, device):
    from own_loop import main

    whole = main(["--epochs", "3", "--limit-batches", "4", "--tracker", "none", "--output-dir", str(tmp_path / "a")])
    main(["--epochs", "2", "--limit-batches", "4", "--tracker", "none", "--output-dir", str(tmp_path / "b")])
    capsys.readouterr()
    resumed = main(["--epochs", "3", "--limit-batches", "4", "--tracker", "none", "--output-dir",
                    str(tmp_path / "b"), "--resume"])
    assert resumed == whole
    assert re.findall(r"epoch (\d):", capsys.readouterr().out) == ["3"]
