"""What a training run writes into its ``OUT`` folder, and when.

``checkpoint.pt`` (best epoch) is written before ``last.pt`` (every epoch), so a run
killed between the two never leaves ``last.pt`` ahead of a missing best; both are
atomic. A fresh run refuses an ``OUT`` that already holds checkpoints unless it resumes
or is told to overwrite; temp files of killed runs are removed at start. Also
``metrics.jsonl``, ``curves.png``, ``confusion.png``, ``config.yaml``, ``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from serve.files import atomic_write_json, atomic_write_text, remove_stale_temp_files
from serve.plots import plot_confusion
from train.checkpoint import Checkpoint, save_checkpoint
from train.plots import plot_curves

log = logging.getLogger(__name__)

CHECKPOINTS = ("checkpoint.pt", "last.pt")


class OutputExists(ValueError):
    """OUT already holds a run and neither resume nor overwrite was asked for."""


def banner(msg: str) -> None:
    """A message nobody can miss."""
    line = "!" * 78
    log.warning("\n%s\n!! %s\n%s\n", line, msg, line)


class RunOutputs:
    """The files of one run in ``out`` (only the main process writes)."""

    def __init__(self, out: Path, resuming: bool, overwrite: bool) -> None:
        self.out = out
        existing = [n for n in CHECKPOINTS if (out / n).is_file()]
        if existing and not (resuming or overwrite):
            raise OutputExists(
                f"{out} already holds {', '.join(existing)} from an earlier run: resume it "
                f"(--resume {out / 'last.pt'}), pass --overwrite, or choose another --out"
            )
        self.metrics_path = out / "metrics.jsonl"

    def start(self, config: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Create OUT, drop temp files of killed runs, write config.yaml and the history
        so far (a resumed run keeps its earlier epochs)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(self.out):
            log.info("removed %s (left by a killed run)", stale)
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    def epoch(self, row: dict[str, Any], ckpt: Checkpoint, improved: bool, title: str) -> None:
        """Append the metrics row, save the checkpoints (best first), redraw the curves."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if improved:
            save_checkpoint(ckpt, self.out / "checkpoint.pt")
        save_checkpoint(ckpt, self.out / "last.pt")
        plot_curves(ckpt.history, self.out / "curves.png", title=title)

    def finish(
        self,
        summary: dict[str, Any],
        confusion: list[list[int]] | None,
        classes: list[str],
        title: str,
    ) -> None:
        if confusion is not None:
            plot_confusion(confusion, classes, self.out / "confusion.png", title=title)
        atomic_write_json(self.out / "summary.json", summary)
