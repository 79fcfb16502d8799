"""Torch-free plots shared by the stages (train depends on serve, never the reverse)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_confusion(
    counts: list[list[int]], classes: list[str], path: str | Path, title: str = ""
) -> None:
    """Confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    import numpy as np

    cm = np.asarray(counts)
    n = len(classes)
    size = min(2 + 0.6 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ticks = range(n)
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=title or f"accuracy {np.trace(cm) / max(cm.sum(), 1):.2%}",
    )
    if n <= 30:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > threshold else "black",
                )
    save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:  # noqa: ANN001 - a Figure
    """Save a matplotlib figure as PNG atomically (temp + rename) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path
