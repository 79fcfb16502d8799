"""Training curves as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from serve.core.plots import save_figure


def plot_curves(
    history: list[dict[str, Any]],
    path: str | Path,
    title: str = "",
    stages: list[tuple[int, str]] | None = None,
) -> None:
    """Loss, top-1 accuracy (%) and learning rate per epoch (train and val), the best
    epoch (highest val accuracy, ties by lower val loss) marked in each panel; ``stages``
    (first epoch, name) draws each stage's boundary and name (LP-FT: the linear probe is
    epoch 0)."""
    epochs = [h["epoch"] for h in history]
    best = min(history, key=lambda h: (-h["val_acc"], h["val_loss"])) if history else None
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(
        1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.7]}
    )
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h["val_acc"] for h in history], "s-", label="val")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax_lr.plot(epochs, [h["lr"] for h in history], "d-", color="tab:gray")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (at the epoch's start)")
    lrs = [h["lr"] for h in history if h["lr"] > 0]
    if lrs and max(lrs) > 20 * min(lrs):  # decays over orders of magnitude
        ax_lr.set_yscale("log")
    else:
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best is not None:
            ax.axvline(best["epoch"], color="tab:green", ls="--", lw=1)
        for start, _ in (stages or [])[1:]:
            ax.axvline(start - 0.5, color="black", ls=":", lw=1)
    if best is not None:
        ax_acc.annotate(
            f"best: epoch {best['epoch']}, val {100 * best['val_acc']:.2f}%",
            (best["epoch"], 100 * best["val_acc"]),
            xytext=(0.98, 0.04),
            textcoords="axes fraction",
            ha="right",
            color="tab:green",
            arrowprops={"arrowstyle": "->", "color": "tab:green"},
        )
    for start, name in stages or []:
        ax_lr.annotate(
            name,
            (start - 0.45, 0.98),
            xycoords=("data", "axes fraction"),
            va="top",
            fontsize=8,
        )
    ax_loss.legend(loc="upper right")
    ax_acc.legend(loc="lower left")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
