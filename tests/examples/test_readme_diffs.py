"""The README's own-loop diffs run as written, before and after, and add at most six lines each."""


import pytest
import torch

from helpers import ROOT, assert_same_tensors, launch_two_processes, parameters_of, without_timings

README = ROOT / "README.md"


def readme_diff(name: str) -> list[str]:
    marker = f"<!-- guard diff: {name}"
    block = README.read_text().split(marker, 1)[1].split("```diff\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def version(lines: list[str], side: str) -> str:
    """The script before (``side="-"``) or after (``"+"``) the diff."""
    return "\n".join(line[1:] for line in lines if not line or line[0] in (" ", side)) + "\n"


def run(source: str, name: str) -> dict:
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    exec(compile(source, f"README.md {name}", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


@pytest.mark.parametrize("name", ["plain PyTorch", "Accelerate", "EMA copy"])
def test_each_diff_adds_at_most_six_lines(name):
    lines = readme_diff(name)
    assert sum(line.startswith("+") for line in lines) <= 6
    assert all(not line or line[0] in " +-" for line in lines), "not a diff"


def test_the_plain_pytorch_diff_runs_before_and_after(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = readme_diff("plain PyTorch")
    run(version(lines, "-"), "plain loop, before")
    after = run(version(lines, "+"), "plain loop, after")
    records = after["guard"].records
    assert [r["epoch"] for r in records] == [1, 2, 3] and all("train_acc" in r for r in records)
    assert after["metrics"]["acc"] == records[-1]["eval_acc"]  # what the script saw is what was recorded
    assert (tmp_path / "best.pt").exists()


def test_the_ema_diff_recalibrates_the_copy_and_leaves_training_alone():
    lines = readme_diff("EMA copy")
    before, after = run(version(lines, "-"), "EMA, before"), run(version(lines, "+"), "EMA, after")
    assert_same_tensors(parameters_of(before["model"]), parameters_of(after["model"]))
    assert [r["recalibrated"] for r in after["guard"].records] == [True, True, True]
    assert after["metrics"]["acc"] >= before["metrics"]["acc"]
    copied = before["ema"].module[1].running_var  # AveragedModel copies the trained model's statistics
    assert torch.equal(copied, before["model"][1].running_var)
    assert not torch.equal(after["ema"].module[1].running_var, after["model"][1].running_var)


def _accelerate_diff_on_one_rank(out_dir: str):
    namespace = run(version(readme_diff("Accelerate"), "+"), "Accelerate, after")
    accelerator, guard = namespace["accelerator"], namespace["guard"]
    torch.save({"records": guard.records, "metrics": namespace["metrics"]},
               f"{out_dir}/rank{accelerator.process_index}.pt")


def test_the_accelerate_diff_runs_on_two_processes(tmp_path):
    launch_two_processes(_accelerate_diff_on_one_rank, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert without_timings(rank0["records"]) == without_timings(rank1["records"])
    assert len(rank0["records"]) == 3 and rank0["metrics"] == rank1["metrics"]
    assert rank0["metrics"]["eval_acc"] == rank0["records"][-1]["eval_acc"]
