"""The question's accuracy graph, drawn from metrics.jsonl records."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STYLE = {"off": ("tab:red", "without bnguard"), "auto": ("tab:blue", "bnguard auto"),
         "always": ("tab:green", "bnguard always"), "monitor": ("tab:purple", "bnguard monitor")}


def plot_accuracy(runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Train and eval accuracy per epoch for each run. Where bnguard recalibrated, a marker shows the eval
    accuracy the running statistics gave before it, joined to the accuracy after; without a run that shows
    those values already ("off"), a dotted line traces them."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    drawn_train: list[list[float]] = []
    for mode, records in runs.items():
        color, label = STYLE.get(mode, ("tab:gray", mode))
        epochs = [r["epoch"] for r in records]
        train = [r["train_acc"] for r in records]
        if train not in drawn_train:  # bnguard leaves the weights alone: identical curves are drawn once
            shared = len(runs) > 1 and all([r["train_acc"] for r in other] == train for other in runs.values())
            ax.plot(epochs, train, color="gray" if shared else color, alpha=0.6, linestyle="--",
                    label="train accuracy (same weights in every run)" if shared else f"train accuracy, {label}")
            drawn_train.append(train)
        ax.plot(epochs, [r["eval_acc"] for r in records], color=color, marker="o", markersize=3,
                zorder=3 if mode == "off" else 2, label=f"eval accuracy, {label}")
        fixed = [r for r in records if r.get("recalibrated") and r.get("eval_acc_before_recal") is not None]
        if not fixed:
            continue
        if "off" not in runs:
            before = [r.get("eval_acc_before_recal") or r["eval_acc"] for r in records]
            ax.plot(epochs, before, color=color, linestyle=":", alpha=0.8,
                    label=f"eval accuracy with the running statistics as trained, {label}")
        ax.vlines([r["epoch"] for r in fixed], [r["eval_acc_before_recal"] for r in fixed],
                  [r["eval_acc"] for r in fixed], color=color, alpha=0.5)
        ax.scatter([r["epoch"] for r in fixed], [r["eval_acc_before_recal"] for r in fixed], color=color,
                   marker="v", s=40, zorder=4, label=f"recalibrated here ({label}): before")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
