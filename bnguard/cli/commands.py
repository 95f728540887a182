"""``inspect`` and ``recalibrate``: load, evaluate, recalibrate, evaluate again, and for a repair write the
checkpoint only if eval accuracy did not drop."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..isolation import restore_statistics, saved_statistics
from ..layers import has_running_statistics
from ..recalibration import recalibrate
from .checkpoints import Checkpoint, check_output, open_checkpoint, write_checkpoint
from .data import load_data
from .errors import DONE, NOT_WRITTEN_WORSE, InputError
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
    after = evaluate(model, data.evaluation(), group.device, label="eval, recalibrated", **scope)
    say(accuracy_line("recalibrated statistics", after, before))
    if args.command == "inspect":
        restore_statistics(stored)
    return {"data": data.description, "before": before, "after": after, "recalibration": report.to_dict()}


def _decide(args: argparse.Namespace, checkpoint: Checkpoint, location: Location, model: nn.Module,
            findings: dict[str, Any], group: Processes, say: Any) -> int:
    worse = findings["after"]["accuracy"] < findings["before"]["accuracy"]
    written = not worse or args.force
    decision = ("written although eval accuracy dropped (--force)" if worse else "written: eval accuracy did not "
                "drop") if written else "not written: eval accuracy would drop; --force writes it anyway"
    findings.update(out=args.out, written=written, decision=decision)
    if written and group.main:
        write_checkpoint(checkpoint, [with_statistics(model, checkpoint, location)], Path(args.out))
    group.wait_for_everyone()
    say(f"{decision}" + (f"\nrepaired checkpoint: {args.out}" if written else ""))
    return DONE if written else NOT_WRITTEN_WORSE


def _silent(*_: Any) -> None:
    """Printing on the other processes: the main one speaks for all."""
