"""``python -m train bench`` (``make bench-train``): time-to-accuracy and training speed.

* ants/bees: the tutorial, feature-extract and (default) finetune recipes, each over
  several seeds, with the offline ImageNet backbone (EfficientNet-Lite0) and with
  ResNet-18 when its ImageNet weights can be had (otherwise the row is recorded as
  skipped, with the reason). Validation accuracy is tracked against wall time from the
  start of the process, so feature caching and the linear probe count. ``antsbees``
  summarizes each recipe: best val acc mean +- std over seeds, time to 90/93/95%, total.
* CIFAR: training and inference images/s of every 32x32 architecture (batch 128).

Writes ``bench/local/train-<date>.json``, ``bench/local/train-latest.json`` and a PNG beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serve.backend.errors import UsageError
from serve.core.files import atomic_write_json

log = logging.getLogger(__name__)

TARGETS = (0.90, 0.93, 0.95)
ANTSBEES_RECIPES = (
    "antsbees_tutorial",
    "antsbees_feature_extract",
    "antsbees_probe",
    "antsbees_finetune",
)


def _resnet18_weights_available(timeout: float) -> tuple[bool, str]:
    from train.models.pretrained import PretrainedUnavailable, torchvision_resnet18_state_dict

    try:
        torchvision_resnet18_state_dict(timeout)
        return True, ""
    except PretrainedUnavailable as e:
        return False, str(e)


def time_to_accuracy(
    name: str,
    recipe: str,
    arch: str,
    out: Path,
    epochs: int | None,
    data: str | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run one recipe as a user would (``python -m train``) and read its metrics back."""
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--recipe",
        recipe,
        "--arch",
        arch,
        "--out",
        str(out),
        "--model",
        name,
        "--overwrite",
        "--seed",
        str(seed),
    ]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if data:
        cmd += ["--data", data]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    if proc.returncode != 0:
        return {"name": name, "status": "failed", "reason": proc.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    # Wall time at the end of each epoch = total - time of the epochs still to come.
    ends, remaining = [], wall
    for row in reversed(rows):
        ends.append(remaining)
        remaining -= row["seconds"]
    ends.reverse()
    curve = [
        {"epoch": r["epoch"], "seconds": round(t, 2), "val_acc": r["val_acc"]}
        for r, t in zip(rows, ends, strict=True)
    ]
    reached = {
        f"{t:.2f}": next((c["seconds"] for c in curve if c["val_acc"] >= t), None) for t in TARGETS
    }
    return {
        "name": name,
        "status": "done",
        "recipe": recipe,
        "seed": seed,
        "loadavg_1m": [round(load0, 2), round(load1, 2)],
        "arch": summary["arch"],
        "mode": summary["mode"],
        "epochs": len(rows),
        "best_val_acc": summary["best_val_acc"],
        "seconds_total": round(wall, 1),
        "seconds_to_acc": reached,
        "curve": curve,
        "pretrained": summary["pretrained"]["source"],
    }


def summarize_recipes(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (recipe, arch) over its seeds: best val acc mean +- std, mean time to each target
    (over the seeds that reached it; ``reached`` counts them) and mean total time."""
    import statistics

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["status"] == "done":
            groups.setdefault((r["recipe"], r["arch"]), []).append(r)
    rows = []
    for (recipe, arch), rs in groups.items():
        accs = [r["best_val_acc"] for r in rs]
        to_acc: dict[str, Any] = {}
        for t in TARGETS:
            key = f"{t:.2f}"
            times = [r["seconds_to_acc"][key] for r in rs if r["seconds_to_acc"].get(key)]
            to_acc[key] = {
                "seconds_mean": round(statistics.fmean(times), 1) if times else None,
                "reached": len(times),
            }
        rows.append(
            {
                "recipe": recipe,
                "arch": arch,
                "seeds": [r["seed"] for r in rs],
                "best_val_acc_mean": statistics.fmean(accs),
                "best_val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "best_val_acc": accs,
                "seconds_to_acc": to_acc,
                "seconds_total_mean": round(statistics.fmean(r["seconds_total"] for r in rs), 1),
            }
        )
    return rows


def merge_previous(report: dict[str, Any], previous: Path) -> None:
    """Add the runs of an earlier report that ``report`` does not repeat (by name), each
    dated (the earlier report's date when it had none), and its CIFAR rows when this one
    has none; runs stay in recipe, arch, seed order."""
    if not previous.is_file():
        log.warning("--merge: no %s, nothing to merge", previous)
        return
    old = json.loads(previous.read_text())
    repeated = {r["name"] for r in report["time_to_accuracy"]}
    kept = [
        {**r, "date": r.get("date", old.get("date"))}
        for r in old.get("time_to_accuracy", [])
        if r["name"] not in repeated
    ]
    order = {f"{recipe.removeprefix('antsbees_')}-": i for i, recipe in enumerate(ANTSBEES_RECIPES)}

    def rank(r: dict[str, Any]) -> tuple[int, str, int]:
        prefix = next((p for p in order if r["name"].startswith(p)), "")
        return (order.get(prefix, len(order)), r.get("arch", r["name"]), r.get("seed", 0))

    report["time_to_accuracy"] = sorted(kept + report["time_to_accuracy"], key=rank)
    if not report["cifar_speed"]:
        report["cifar_speed"] = old.get("cifar_speed", [])
    report["merged_with"] = old.get("date")
    log.info("--merge: kept %d run(s) of %s (%s)", len(kept), previous, old.get("date"))


def images_per_second(arch: str, batch: int = 128, steps: int = 5) -> dict[str, Any]:
    """Training (forward+backward+SGD step) and inference throughput at 32x32
    (train.tools._speed.throughput: the same measurement as the Inception modules')."""
    from train.models.archs import build_model
    from train.tools._speed import throughput

    model = build_model(arch, 10)
    speed = throughput(model, (3, 32, 32), batch, steps, classes=10)
    return {
        "arch": arch,
        "batch": batch,
        "train_images_per_s": round(speed["train_images_per_s"], 1),
        "infer_images_per_s": round(speed["infer_images_per_s"], 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    from serve.core.plots import plt, save_figure

    speeds = report["cifar_speed"]
    fig, axes = plt.subplots(1, 2 if speeds else 1, figsize=(13 if speeds else 7, 4.5))
    ax1 = axes[0] if speeds else axes
    colors: dict[str, Any] = {}
    for run in report["time_to_accuracy"]:
        if run["status"] == "done":
            key = f"{run['recipe']} ({run['arch']})"
            first = key not in colors
            colors.setdefault(key, f"C{len(colors)}")
            ax1.plot(
                [c["seconds"] for c in run["curve"]],
                [c["val_acc"] for c in run["curve"]],
                "o-",
                ms=2,
                lw=1,
                color=colors[key],
                label=key if first else None,
            )
    ax1.set(
        xscale="log",
        xlabel="wall time since start (s, log)",
        ylabel="val accuracy",
        ylim=(0.8, 1.0),
        title=f"ants/bees: val accuracy vs time, one line per seed "
        f"(load {report['machine'].get('loadavg_1m')} on {report['machine']['cores']} cores)",
    )
    for t in TARGETS:
        ax1.axhline(t, color="gray", lw=0.5, ls="--")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    if not speeds:
        save_figure(fig, path)
        return
    ax2 = axes[1]
    names = [s["arch"] for s in speeds]
    xs = range(len(names))
    ax2.bar([i - 0.2 for i in xs], [s["train_images_per_s"] for s in speeds], 0.4, label="train")
    ax2.bar([i + 0.2 for i in xs], [s["infer_images_per_s"] for s in speeds], 0.4, label="infer")
    ax2.set_xticks(list(xs), names, rotation=30, ha="right")
    ax2.set(
        yscale="log",
        ylabel="images/s (log)",
        title=f"CIFAR archs, batch 128, {report['machine']['cores']} cores",
    )
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default="bench/local",
        help="report folder (train-<date>.json, train-latest.json and .png; runs in <out>/runs)",
    )
    p.add_argument("--data", default=None, help="ants/bees ImageFolder (default: the recipes')")
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    p.add_argument(
        "--recipes", nargs="+", default=list(ANTSBEES_RECIPES), help="ants/bees recipes to run"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each ants/bees run"
    )
    p.add_argument(
        "--skip-antsbees", action="store_true", help="no ants/bees time-to-accuracy part"
    )
    p.add_argument("--skip-cifar", action="store_true", help="no CIFAR images/s part")
    p.add_argument(
        "--cifar-archs",
        nargs="+",
        default=None,
        help="CIFAR images/s of these 32 px archs only (default: every one)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs (and CIFAR rows) of <out>/train-latest.json that this "
        "invocation does not repeat (e.g. add seeds of one recipe); each run keeps its date",
    )
    p.add_argument(
        "--download-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for ResNet-18's ImageNet weights (else its rows are skipped)",
    )


def run(a: argparse.Namespace) -> int:
    """``python -m train bench``: see the module docstring."""
    from train.models.archs import ARCHS
    from train.tools._speed import torch_machine

    out = Path(a.out)
    runs = out / "runs"
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": torch_machine(),
        "time_to_accuracy": [],
        "cifar_speed": [],
    }
    if not a.skip_antsbees:
        have_r18, why = _resnet18_weights_available(a.download_timeout)
        for recipe in a.recipes:
            for arch in ("efficientnet_lite0", "resnet18"):
                label = recipe.removeprefix("antsbees_")
                if arch == "resnet18" and not have_r18:
                    report["time_to_accuracy"].append(
                        {"name": f"{label}-{arch}", "status": "skipped", "reason": why}
                    )
                    continue
                for seed in a.seeds:
                    name = f"{label}-{arch}-s{seed}"
                    log.info("bench: %s ...", name)
                    r = time_to_accuracy(
                        name, recipe, arch, runs / name, a.epochs, a.data, seed=seed
                    )
                    r["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                    report["time_to_accuracy"].append(r)
                    log.info(
                        "  best val acc %.2f%%, %.0f s",
                        100 * float(r.get("best_val_acc") or 0),
                        float(r.get("seconds_total") or 0),
                    )
    cifar_archs = getattr(a, "cifar_archs", None)
    for name in cifar_archs or ():
        if name not in ARCHS or ARCHS[name].family != "cifar":
            raise UsageError(f"--cifar-archs: {name!r} is not a 32 px arch")
    for arch, spec in ARCHS.items():
        if cifar_archs and arch not in cifar_archs:
            continue
        if spec.family == "cifar" and not a.skip_cifar:
            report["cifar_speed"].append(images_per_second(arch))
            log.info("bench: %s", report["cifar_speed"][-1])
    if a.merge:
        merge_previous(report, out / "train-latest.json")
    if report["time_to_accuracy"]:
        report["antsbees"] = summarize_recipes(report["time_to_accuracy"])
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"train-{stamp}.json", "train-latest.json"):
        atomic_write_json(out / name, report)
    plot(report, out / "train-latest.png")
    for row in report.get("antsbees", []):
        reach = ", ".join(
            f"{k}: {v['seconds_mean']} s ({v['reached']}/{len(row['seeds'])})"
            for k, v in row["seconds_to_acc"].items()
        )
        print(
            f"{row['recipe']} ({row['arch']}): best val {row['best_val_acc_mean']:.4f} +- "
            f"{row['best_val_acc_std']:.4f}; time to {reach}; total {row['seconds_total_mean']} s"
        )
    print(f"wrote {out}/train-{stamp}.json, {out}/train-latest.json, {out}/train-latest.png")
    return 0
