"""``inspect`` and ``recalibrate``: load, evaluate, recalibrate, evaluate again, and for a repair write the
checkpoint only if eval accuracy did not drop."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..recalibration.isolation import restore_statistics, saved_statistics
from ..recalibration.layers import has_running_statistics
from ..recalibration.recalibrate import recalibrate
from .checkpoints import Checkpoint, check_output, open_checkpoint, recorded_accuracy, write_checkpoint
from .data import load_data
from .errors import DONE, NOT_WRITTEN_UNLIKE, NOT_WRITTEN_WORSE, InputError
from .evaluation import evaluate
from .models import build_model
from .output import accuracy_line, layer_statistics, save_report, statistics_table
from .processes import Processes, processes
from .specs import json_kwargs
from .state_dicts import Location, load_model_state, with_statistics


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with processes(args.device) as group:
        checkpoint = open_checkpoint(Path(args.checkpoint))
        report = args.report or (f"{args.out}.report.json" if args.command == "recalibrate" else None)
        if args.command == "recalibrate":
            check_output(checkpoint, Path(args.out))
        if report:
            check_output(checkpoint, Path(report), "--report", replaceable=True)
        model, location = _load(args, checkpoint)
        model.to(group.device)
        say = print if group.main else _silent
        say(f"{checkpoint.kind} {checkpoint.path}: {type(model).__name__} from {location.describe(checkpoint)}")
        findings: dict[str, Any] = {"command": args.command, "checkpoint": str(checkpoint.path),
                                    "kind": checkpoint.kind, "model": type(model).__name__, "target": args.target,
                                    "location": location.describe(checkpoint), "processes": group.world_size}
        if args.command == "inspect":
            findings["statistics"] = layer_statistics(model)
            say(statistics_table(findings["statistics"]))
        if args.data is not None:
            findings.update(_repair(args, model, group, say))
            findings["unlike_training"] = _unlike_training(findings, recorded_accuracy(checkpoint)
                                                           if args.target == "model" else None)
            if findings["unlike_training"]:
                say(f"the data look unlike the training data: {findings['unlike_training']}")
        code = _decide(args, checkpoint, location, model, findings, group, say) \
            if args.command == "recalibrate" else DONE
        findings["seconds"] = time.perf_counter() - started
        if report and group.main:
            save_report(findings, Path(report))
            say(f"report: {report}")
        group.wait_for_everyone()
        return code


def _load(args: argparse.Namespace, checkpoint: Checkpoint) -> tuple[nn.Module, Location]:
    model = build_model(args.model, json_kwargs(args.model_kwargs, "--model-kwargs"), checkpoint)
    location = load_model_state(model, checkpoint, args.target)
    if not has_running_statistics(model):
        raise InputError(f"{type(model).__name__} has no BatchNorm layer with running statistics: there is nothing "
                         "to inspect or recalibrate")
    return model, location


def _repair(args: argparse.Namespace, model: nn.Module, group: Processes, say: Any) -> dict[str, Any]:
    """Eval accuracy with the stored statistics, recalibration on the training split, accuracy again."""
    kwargs = json_kwargs(args.data_kwargs, "--data-kwargs")
    data = load_data(args.data, args, kwargs, group.rank, group.world_size)
    say(f"data: {data.description}")
    scope = dict(rank=group.rank, world_size=group.world_size)
    before = evaluate(model, data.evaluation(), group.device, label="eval, stored statistics", **scope)
    say(accuracy_line("stored statistics", before))
    stored = saved_statistics(model)
    torch.manual_seed(args.seed)  # the training split's random augmentations: the same on every run
    try:
        report = recalibrate(model, data.train(), tolerance=args.tolerance, num_samples=args.samples,
                             progress=group.main)
    except ValueError as error:  # no training batch, or batches recalibrate cannot use
        raise InputError(f"--data {args.data}: {error}") from None
    say(str(report))
    if (unmet := tolerance_unmet(report)) is not None:
        say(unmet)
    after = evaluate(model, data.evaluation(), group.device, label="eval, recalibrated", **scope)
    say(accuracy_line("recalibrated statistics", after, before))
    if args.command == "inspect":
        restore_statistics(stored)
    return {"data": data.description, "before": before, "after": after, "recalibration": report.to_dict(),
            "tolerance_unmet": unmet}


def tolerance_unmet(report: Any) -> str | None:
    """When the data ran out before the tolerance was met: the bound reached, and what would meet it (the
    bound falls as one over the square root of the samples)."""
    bound, tolerance = report.error_bound, report.tolerance
    if tolerance is None or bound is None or bound <= tolerance or report.stopped == "tolerance met":
        return None
    needed = math.ceil(report.samples * (bound / tolerance) ** 2)
    more = "more training data" if report.stopped == "end of data" else "a larger --samples"
    return (f"tolerance {tolerance:g} not met: {report.stopped} at error bound {bound:.4f} after {report.samples} "
            f"samples; meeting it would take about {needed} samples ({more}), or --tolerance "
            f"{math.ceil(bound * 100) / 100:g} accepts this bound")


def _unlike_training(findings: dict[str, Any], recorded: float | None) -> str | None:
    """Why the data given are probably not what the model was trained on, or None: the model scores at chance
    with the stored and the recalibrated statistics alike, or both far below the checkpoint's own records."""
    before, after = findings["before"]["accuracy"], findings["after"]["accuracy"]
    chance, best = 1 / max(findings["before"]["classes"], 1), max(before, after)
    scores = f"{100 * before:.2f}% with the stored statistics, {100 * after:.2f}% recalibrated"
    if findings["before"]["classes"] > 1 and best <= 1.5 * chance:
        return f"the model scores at chance ({100 * chance:.3g}% for {findings['before']['classes']} classes): {scores}"
    if recorded is not None and best < recorded - 0.2:
        return f"its own records give {100 * recorded:.2f}% eval accuracy, and here: {scores}"
    return None


def _decide(args: argparse.Namespace, checkpoint: Checkpoint, location: Location, model: nn.Module,
            findings: dict[str, Any], group: Processes, say: Any) -> int:
    worse = findings["after"]["accuracy"] < findings["before"]["accuracy"]
    unlike = findings["unlike_training"] is not None
    written = not (worse or unlike) or args.force
    if unlike:
        decision = ("written although the data look unlike training (--force)" if written else "not written: the "
                    "data probably do not match training (check --data, --image-size, --normalize); --force writes "
                    "it anyway")
    elif worse:
        decision = ("written although eval accuracy dropped (--force)" if written else "not written: eval accuracy "
                    "would drop; --force writes it anyway")
    else:
        decision = "written: eval accuracy did not drop"
    findings.update(out=args.out, written=written, decision=decision)
    if written and group.main:
        write_checkpoint(checkpoint, [with_statistics(model, checkpoint, location)], Path(args.out))
    group.wait_for_everyone()
    say(f"{decision}" + (f"\nrepaired checkpoint: {args.out}" if written else ""))
    return DONE if written else NOT_WRITTEN_UNLIKE if unlike else NOT_WRITTEN_WORSE


def _silent(*_: Any) -> None:
    """Printing on the other processes: the main one speaks for all."""
