"""Checkpoints that verify themselves, falling back to the newest good one, and one command for every start."""

import json

import pytest
import torch

from bnguard.utils.manifest import MANIFEST, CheckpointError
from helpers import toy_loop


def records(path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run(tmp_path):
    """Two epochs with a checkpoint after each."""
    toy_loop(tmp_path, epochs=2, checkpoint_every_epochs=1).fit()
    return tmp_path


def parameters(loop):
    return [p.detach().clone() for p in loop.model.parameters()]


def test_every_file_is_in_the_manifest(run):
    folder = run / "checkpoints" / "epoch-0002"
    files = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    assert set(files) == on_disk and {"model.safetensors", "random_states_0.pkl"} <= on_disk
    assert all(files[name]["size"] == (folder / name).stat().st_size for name in files)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda f: flip_a_byte(f / "model.safetensors"), r"model\.safetensors changed since it was written"),
    (lambda f: (f / "random_states_0.pkl").write_bytes((f / "random_states_0.pkl").read_bytes()[:100]),
     r"random_states_0\.pkl has 100 bytes"),
    (lambda f: (f / "random_states_0.pkl").unlink(), r"random_states_0\.pkl is missing"),
    (lambda f: (f / MANIFEST).unlink(), "has no bnguard-manifest.json: it is incomplete"),
])
def test_a_damaged_checkpoint_is_named_and_nothing_is_loaded(run, damage, message):
    folder = run / "checkpoints" / "epoch-0002"
    damage(folder)
    loop = toy_loop(run, epochs=3, checkpoint_every_epochs=1)
    before = parameters(loop)
    with pytest.raises(CheckpointError, match=f"checkpoint {folder}: .*{message}|checkpoint {folder} {message}"):
        loop.fit(resume_from=folder)
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(loop)))


def test_latest_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, run):
    whole = tmp_path / "whole"
    toy_loop(whole, epochs=3, checkpoint_every_epochs=1).fit()
    flip_a_byte(run / "checkpoints" / "epoch-0002" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"epoch-0002: model\.safetensors changed.*falling back"):
        toy_loop(run, epochs=3, checkpoint_every_epochs=1).fit(resume_from="latest")
    assert records(run) == records(whole)  # epochs 2 and 3 trained again from epoch 1's checkpoint


def test_one_command_for_the_first_start_and_every_restart(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint; pass missing_ok=True"):
        toy_loop(tmp_path / "strict", epochs=1).fit(resume_from="latest")
    first = toy_loop(tmp_path / "run", epochs=2, checkpoint_every_epochs=1).fit(resume_from="latest", missing_ok=True)
    assert first["epoch"] == 2


def test_missing_ok_never_hides_checkpoints_that_fail(run):
    for folder in (run / "checkpoints").iterdir():
        (folder / MANIFEST).unlink()
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no checkpoint that verifies"):
        toy_loop(run, epochs=3).fit(resume_from="latest", missing_ok=True)


def test_a_finished_run_returns_its_last_record(run, capsys):
    last = records(run)[-1]
    again = toy_loop(run, epochs=2, checkpoint_every_epochs=1).fit(resume_from="latest")
    assert {k: v for k, v in again.items() if k != "seconds"} == last
    assert "is already complete (epoch 2): nothing left to train" in capsys.readouterr().out
    assert records(run)[-1] == last and len(records(run)) == 2


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


DAMAGES = {
    "torn last line": lambda text: text[:-25],
    "garbage last line": lambda text: text + "}{not json\n",
    "NUL-padded tail": lambda text: text + "\x00" * 300,
    "missing lines": lambda text: "".join(line + "\n" for i, line in enumerate(text.splitlines()) if i not in (2, 3)),
    "torn line of the next epoch": lambda text: text + '{"epoch": 5, "step": 3',
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_metrics_file_is_recovered_from_the_checkpoint_on_resume(tmp_path, damage):
    from helpers import without_timings

    whole = toy_loop(tmp_path / "whole", epochs=6, checkpoint_every_epochs=1)
    whole.fit()
    expected = without_timings(lines_of(tmp_path / "whole" / "metrics.jsonl"))
    toy_loop(tmp_path / "cut", epochs=4, checkpoint_every_epochs=1).fit()
    metrics = tmp_path / "cut" / "metrics.jsonl"
    metrics.write_text(DAMAGES[damage](metrics.read_text()))
    with pytest.warns(UserWarning, match=str(metrics)):
        toy_loop(tmp_path / "cut", epochs=6, checkpoint_every_epochs=1).fit(resume_from="latest")
    assert without_timings(lines_of(metrics)) == expected
