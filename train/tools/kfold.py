"""``python -m train cv``: choose between recipe settings on the TRAINING images only.

Stratified k-fold over ``<data>/train`` (the official val split is never read): each fold
becomes an ImageFolder root of symlinks (``train/`` = the other folds, ``val/`` = this
fold) and every candidate trains on it as ``python -m train`` would, for each seed. The
score is the held-out accuracy of the *last* epoch (the best epoch would be chosen on the
held-out fold itself, an optimistic number). Results are written after every run
(``cv-latest.json``) and a finished (candidate, fold, seed) is not run again, so an
interrupted search resumes.

A candidate is ``"LABEL RECIPE [key=value ...]"``, e.g.
``--candidate "lpft antsbees_finetune" --candidate "lpft_ta antsbees_finetune
auto_augment=trivialaugment"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.backend.errors import UsageError
from serve.core.files import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One setting to score: a recipe plus config overrides."""

    label: str
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``"LABEL RECIPE key=value ..."`` (values parsed as YAML)."""
        from train.config import parse_sets

        parts = text.split()
        if len(parts) < 2:
            raise UsageError(f"candidate needs 'LABEL RECIPE [key=value ...]', got {text!r}")
        return cls(parts[0], parts[1], parse_sets(parts[2:]))


def stratified_indices(labels: list[int], k: int, seed: int = 0) -> list[list[int]]:
    """``k`` stratified folds of ``labels``' indices: each class (in sorted order) shuffled
    with one ``random.Random(seed)`` and dealt round-robin, so every fold keeps the class
    balance."""
    if k < 2:
        raise UsageError(f"folds must be >= 2, got {k}")
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    for c in sorted(set(labels)):
        idx = [i for i, t in enumerate(labels) if t == c]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            out[j % k].append(i)
    return out


def stratified_folds(root: Path, k: int, seed: int = 0) -> list[dict[str, list[Path]]]:
    """``k`` folds of ``root/train``: per fold, class -> held-out image paths
    (:func:`stratified_indices` over the files in sorted order)."""
    from train.data.datasets import is_image_file  # torch: not for --help

    train = root / "train"
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise UsageError(f"{train} has no class folders")
    files = [
        (c, f)
        for c in classes
        for f in sorted(p for p in (train / c).iterdir() if is_image_file(p.name))
    ]
    folds: list[dict[str, list[Path]]] = [{c: [] for c in classes} for _ in range(k)]
    labels = [classes.index(c) for c, _ in files]
    for i, part in enumerate(stratified_indices(labels, k, seed)):
        for j in part:
            c, f = files[j]
            folds[i][c].append(f)
    return folds


def materialize_fold(folds: list[dict[str, list[Path]]], i: int, dest: Path) -> Path:
    """An ImageFolder root of symlinks: ``val/`` = fold ``i``, ``train/`` = the others."""
    if (dest / ".complete").exists():
        return dest
    for j, fold in enumerate(folds):
        split = "val" if j == i else "train"
        for c, files in fold.items():
            d = dest / split / c
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = d / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    (dest / ".complete").touch()
    return dest


def score_run(cand: Candidate, data: Path, out: Path, seed: int) -> dict[str, Any]:
    """Train ``cand`` on one fold; the held-out result of its last epoch."""
    from train.config import resolve_config
    from train.run.trainer import Run

    cfg = resolve_config(
        cand.recipe,
        {**cand.overrides, "data": str(data), "out": str(out), "seed": seed, "overwrite": True},
    )
    t0 = time.perf_counter()
    summary = Run(cfg).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "last_acc": rows[-1]["val_acc"],
        "last_loss": rows[-1]["val_loss"],
        "best_acc": summary["best_val_acc"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(results: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per candidate: mean/std of the held-out last-epoch accuracy and loss over runs."""
    rows = []
    for label in labels:
        runs = [r for r in results if r["candidate"] == label]
        if not runs:
            continue
        accs = [r["last_acc"] for r in runs]
        losses = [r["last_loss"] for r in runs]
        rows.append(
            {
                "candidate": label,
                "runs": len(runs),
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "loss_mean": statistics.fmean(losses),
                "seconds_mean": statistics.fmean(r["seconds"] for r in runs),
            }
        )
    return rows


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar chart of the held-out accuracy per candidate (mean +- std)."""
    from serve.core.plots import plt, save_figure

    rows = report["table"]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 4))
    ax.bar(
        [r["candidate"] for r in rows],
        [r["acc_mean"] for r in rows],
        yerr=[r["acc_std"] for r in rows],
        capsize=4,
    )
    lo = min((r["acc_mean"] - r["acc_std"] for r in rows), default=0.8)
    ax.set(
        ylim=(max(0.0, lo - 0.03), 1.0),
        ylabel="held-out accuracy (last epoch)",
        title=f"{report['folds']}-fold CV on the training images, seeds {report['seeds']}",
    )
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="ImageFolder root (default: the hymenoptera data)")
    p.add_argument("--candidate", action="append", required=True, help="'LABEL RECIPE k=v ...'")
    p.add_argument("--folds", type=int, default=3, help="k of the stratified k-fold split")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds each candidate trains with per fold",
    )
    p.add_argument(
        "--out",
        default="bench/local/cv",
        help="cv-latest.json and .png, the folds and the runs (a finished run is not repeated)",
    )


def run(a: argparse.Namespace) -> int:
    """``python -m train cv``: see the module docstring."""
    from tqdm import tqdm

    from train.config import default_data

    data = Path(a.data or default_data())
    out = Path(a.out)
    cands = [Candidate.parse(c) for c in a.candidate]
    folds = stratified_folds(data, a.folds)
    report_path = out / "cv-latest.json"
    old = json.loads(report_path.read_text()) if report_path.exists() else {}
    results = [r for r in old.get("results", []) if r["candidate"] in {c.label for c in cands}]
    done = {(r["candidate"], r["fold"], r["seed"]) for r in results}
    jobs = [(c, i, s) for c in cands for i in range(a.folds) for s in a.seeds]
    for cand, i, seed in tqdm(jobs, desc="cv"):
        if (cand.label, i, seed) in done:
            continue
        root = materialize_fold(folds, i, out / "folds" / f"k{a.folds}-{i}")
        r = score_run(cand, root, out / "runs" / f"{cand.label}-f{i}-s{seed}", seed)
        results.append({"candidate": cand.label, "fold": i, "seed": seed, **r})
        log.info(
            "cv %s fold %d seed %d: held-out acc %.2f%%", cand.label, i, seed, 100 * r["last_acc"]
        )
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "data": str(data),
            "folds": a.folds,
            "seeds": a.seeds,
            "candidates": [c.__dict__ for c in cands],
            "results": results,
            "table": table(results, [c.label for c in cands]),
        }
        atomic_write_json(report_path, report)
        plot(report, out / "cv-latest.png")
    final = json.loads(report_path.read_text()) if report_path.exists() else {"table": []}
    for row in final["table"]:
        print(
            f"{row['candidate']:>16}  {row['acc_mean']:.4f} +- {row['acc_std']:.4f}  "
            f"loss {row['loss_mean']:.4f}  ({row['runs']} runs, {row['seconds_mean']:.0f} s each)"
        )
    return 0
