"""The command line's options: ``bnguard inspect`` and ``bnguard recalibrate``."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..utils.validation import fraction
from .forms import AVERAGED, DATA_FORMS, MODEL, MODEL_FORMS, normalization

EXAMPLES = """\
checkpoints read: a bnguard Loop checkpoint folder (checked against its manifest), a Lightning .ckpt,
a Hugging Face save_pretrained folder, a state dict (.pt, .pth, .bin or .safetensors, bare or under
'state_dict' / 'model'); --target averaged for the AveragedModel / EMA state such a file holds (module.*
keys beside n_averaged, Lightning's WeightAveraging, an AveragedModel registered in a Loop checkpoint).

examples:
  bnguard inspect runs/RUN/checkpoints/epoch-0020 --model examples/models.py:SeedNet \\
      --model-kwargs '{"num_classes": 10, "in_channels": 1}' --data digits
  bnguard recalibrate swa.pt --target averaged --model torchvision:resnet18 \\
      --data imagefolder:leaves --image-size 64 --out swa-repaired.pt
  bnguard recalibrate finetuned/ --data mypackage.data:loaders --out finetuned-repaired/
  torchrun --nproc_per_node 2 -m bnguard recalibrate model.ckpt --model mypackage.models:Net \\
      --data mypackage.data:loaders --out fixed.ckpt

exit codes: 0 done; 1 failed; 2 bad input (the message says what to change); 3 not written: the recalibrated
statistics scored a lower eval accuracy than the stored ones; 4 not written: the data look unlike the training
data (the model scores at chance with either statistics, or far below its checkpoint's own records). --force
writes in both cases.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bnguard", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Inspect and repair the BatchNorm running statistics of a saved model.")
    parser.add_argument("--version", action="version", version=f"bnguard {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{inspect,recalibrate}")
    inspect = commands.add_parser(
        "inspect", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        help="the BatchNorm layers and their statistics; with --data, eval accuracy with the stored and with "
             "recalibrated statistics and how far each layer is from them; writes nothing")
    repair = commands.add_parser(
        "recalibrate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        help="recalibrate, evaluate before and after, write a new checkpoint if not worse, with a JSON report")
    for sub, data_required in ((inspect, False), (repair, True)):
        _common(sub, data_required)
    inspect.add_argument("--report", help="also save the findings as JSON here")
    repair.add_argument("--out", required=True, help="the repaired checkpoint, in the input's form; must not exist")
    repair.add_argument("--report", help="the JSON report (default: OUT.report.json; replaced if it exists)")
    repair.add_argument("--force", action="store_true", help="write even when eval accuracy got worse")
    return parser.parse_args(argv)


def _common(parser: argparse.ArgumentParser, data_required: bool) -> None:
    parser.add_argument("checkpoint", help="the saved model: a folder or a file (see below)")
    parser.add_argument("--model", metavar="SPEC",
                        help=f"the network: {MODEL_FORMS}; not needed for a Hugging Face folder")
    parser.add_argument("--model-kwargs", metavar="JSON", help="JSON keyword arguments for the model factory")
    parser.add_argument("--target", choices=[MODEL, AVERAGED], default=MODEL,
                        help="model (default), or the averaged model (AveragedModel / EMA) the file holds")
    parser.add_argument("--data", required=data_required, metavar="SPEC",
                        help=f"{DATA_FORMS} returning (train, eval) loaders: the data the model was trained on"
                             + ("" if data_required else "; without it, statistics only"))
    parser.add_argument("--data-kwargs", metavar="JSON", help="JSON keyword arguments for the data factory")
    parser.add_argument("--image-size", type=_positive, default=32, metavar="N",
                        help="height and width for digits / imagefolder (default 32)")
    parser.add_argument("--normalize", type=_normalization, default=None, metavar="HOW",
                        help="imagefolder: none (default), imagenet, or MEANS:STDS, e.g. 0.5,0.5,0.5:0.2,0.2,0.2")
    parser.add_argument("--seed", type=int, default=2, metavar="N",
                        help="split and shuffle seed for digits / imagefolder (default 2, the example's)")
    parser.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                        help="batch size for digits / imagefolder (default 32)")
    parser.add_argument("--workers", type=_non_negative, default=0, metavar="N", help="data loader workers")
    parser.add_argument("--tolerance", type=_tolerance, default=0.1, metavar="T",
                        help="stop once every layer's 95%% error bound is within this (default 0.1), or off")
    parser.add_argument("--samples", type=_positive, metavar="N", help="at most this many training samples")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU, unless "
                                         "ACCELERATE_USE_CPU is set)")


def _version() -> str:
    try:
        return version("bnguard")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _positive(text: str) -> int:
    return _integer(text, minimum=1)


def _non_negative(text: str) -> int:
    return _integer(text, minimum=0)


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer of {minimum} or more, got {text!r}")
    return value


def _normalization(text: str) -> Any:
    try:
        return normalization(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}, got {text!r}") from None


def _tolerance(text: str) -> float | None:
    if text == "off":
        return None
    try:
        return fraction("tolerance", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or off, got {text!r}") from None
