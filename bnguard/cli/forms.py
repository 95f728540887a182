"""What the options take, in words and parsed: importable without torch, so that ``bnguard --help`` and
bad options answer at once."""

from __future__ import annotations

DATA_FORMS = "--data digits, --data imagefolder:DIR or --data package.module:factory"
MODEL_FORMS = "--model torchvision:NAME, --model hf:FOLDER or --model package.module:factory (with --model-kwargs)"
MODEL, AVERAGED = "model", "averaged"  # the --target choices
IMAGENET = "imagenet"

Normalization = str | tuple[tuple[float, ...], tuple[float, ...]] | None


def normalization(text: str) -> Normalization:
    """``--normalize``: none, imagenet, or MEANS:STDS as comma-separated numbers per channel."""
    if text == "none":
        return None
    if text == IMAGENET:
        return IMAGENET
    means, _, stds = text.partition(":")
    try:
        pair = tuple(float(v) for v in means.split(",")), tuple(float(v) for v in stds.split(","))
    except ValueError:
        pair = ((), ())
    if not pair[0] or len(pair[0]) != len(pair[1]) or min(pair[1]) <= 0:
        raise ValueError("expected none, imagenet, or means:stds, e.g. 0.5,0.5,0.5:0.25,0.25,0.25")
    return pair
