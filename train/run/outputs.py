"""What a training run writes into its ``OUT`` folder, and when.

``checkpoint.pt`` (best epoch) is written before ``last.pt`` (every epoch), so a run
killed between the two never leaves ``last.pt`` ahead of a missing best; both are
atomic. A fresh run refuses an ``OUT`` that already holds checkpoints unless it resumes
or is told to overwrite - except when it holds a *finished* run of exactly the same
settings (:func:`finished_run`): then there is nothing to train and the run is skipped,
so ``make train export`` can be run again. Temp files of killed runs are removed at
start. Also
``metrics.jsonl``, ``curves.png``, ``confusion.png``, ``config.yaml``, ``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from serve.backend.errors import UserError
from serve.core import hints
from serve.core.files import atomic_write_json, atomic_write_text, remove_stale_temp_files
from serve.core.plots import plot_confusion
from train.models.checkpoint import Checkpoint, save_checkpoint
from train.run.plots import plot_curves

log = logging.getLogger(__name__)

CHECKPOINTS = ("checkpoint.pt", "last.pt")


class OutputExists(UserError, ValueError):
    """OUT already holds a run and neither resume nor overwrite was asked for."""


def banner(msg: str) -> None:
    """A message nobody can miss."""
    line = "!" * 78
    log.warning("\n%s\n!! %s\n%s\n", line, msg, line)


# Settings that say how a run was started, not what it trains.
NOT_COMPARED = ("resume", "overwrite")


def settings_differences(out: Path, settings: dict[str, Any]) -> list[str] | None:
    """``key: old -> new`` for each setting in which ``out/config.yaml`` differs from
    ``settings`` (None when there is no readable config.yaml)."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    new = yaml.safe_load(yaml.safe_dump(settings, sort_keys=False))  # YAML's types
    return [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in new.items()
        if k not in NOT_COMPARED and saved.get(k) != v
    ]


def finished_run(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of the run in ``out`` when it finished (``summary.json`` and both
    checkpoints present) with exactly ``settings`` (the resolved TrainConfig, ``data``
    resolved), else None. Seeded training would only repeat it."""
    if not all((out / n).is_file() for n in (*CHECKPOINTS, "summary.json")):
        return None
    if settings_differences(out, settings) != []:
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


class RunOutputs:
    """The files of one run in ``out`` (only the main process writes)."""

    def __init__(
        self,
        out: Path,
        resuming: bool,
        overwrite: bool,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.out = out
        existing = [n for n in CHECKPOINTS if (out / n).is_file()]
        if existing and not (resuming or overwrite):
            diff = settings_differences(out, settings) if settings is not None else None
            why = f" with other settings ({'; '.join(diff)})" if diff else ""
            state = "" if (out / "summary.json").is_file() else " (unfinished)"
            resume = hints.flag(f"--resume {out / 'last.pt'}")
            another = "OUT" if hints.via_make() else "--out"
            raise OutputExists(
                f"{out} already holds {', '.join(existing)} from an earlier run{state}{why}: "
                f"resume it ({resume}), start over ({hints.flag('--overwrite')}), or choose "
                f"another {another}"
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

    def epoch(
        self,
        row: dict[str, Any],
        ckpt: Checkpoint,
        improved: bool,
        title: str,
        stages: list[tuple[int, str]] | None = None,
    ) -> None:
        """Append the metrics row, save the checkpoints (best first), redraw the curves."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if improved:
            save_checkpoint(ckpt, self.out / "checkpoint.pt")
        save_checkpoint(ckpt, self.out / "last.pt")
        plot_curves(ckpt.history, self.out / "curves.png", title=title, stages=stages)

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
