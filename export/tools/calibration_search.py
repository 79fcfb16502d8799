"""INT8 calibration chosen honestly: every choice judged on training images only.

``python -m export calibrate`` quantizes a run's FP32 ONNX once per candidate - ONNX
Runtime's calibration method (MinMax, Percentile, Entropy) x per-channel or per-tensor
weights x the number of calibration images - and compares each INT8 model with the FP32
graph on **held-out training images**: the training split is cut in two (fixed seed),
one half calibrates, the other selects. The candidate with the most top-1 agreement on
the selection half (ties: the smaller median |logit diff|, then the fewer calibration
images) is chosen; the val images the export gate judges never influence the choice.
Each candidate's val agreement, labelled accuracy and gate verdict (the export's
:func:`export.checks.parity.judge` and gate) are then *reported* beside it, so the report
shows whether the training-image choice also passes on val - which is the honest
answer to "can plain INT8 pass?".

Writes ``<out>/int8-calibration-latest.json`` and a PNG beside it, and prints the
``make export PRECISION=int8 EXPORT_ARGS=...`` flags of the chosen settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.checks.parity import ACCURACY_GATE, AccuracyGate, diff_stats, judge
from export.checks.stages import PixelBatches, StageName
from export.formats.int8 import (
    CALIBRATION_METHODS,
    Calibration,
    cpu_has_vnni,
    preprocess_for_quantization,
    quantize_int8,
)
from serve.backend.errors import UsageError
from serve.core.files import atomic_write_json
from serve.core.machine import machine_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchConfig:
    """What ``python -m export calibrate`` compares, and where it writes."""

    checkpoint: Path
    onnx: Path | None = None  # default: model.onnx beside the checkpoint
    data: str = ""  # default: the checkpoint's training data
    out: Path = Path("bench/local")
    methods: tuple[str, ...] = CALIBRATION_METHODS
    per_channel: tuple[bool, ...] = (True, False)
    counts: tuple[int, ...] = (32, 0)  # 0: the whole calibration half
    batch_size: int = 16
    workers: int = 2
    seed: int = 0
    gate: AccuracyGate = field(default_factory=lambda: ACCURACY_GATE)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in CALIBRATION_METHODS]
        if bad or not self.methods:
            raise UsageError(f"calibration methods must be among {CALIBRATION_METHODS}: {bad}")
        if any(c < 0 for c in self.counts) or not self.counts:
            raise UsageError(f"calibration counts must be >= 0 (0: all), got {self.counts}")


def split_training(pixels: PixelBatches, seed: int, batch_size: int) -> tuple[PixelBatches, ...]:
    """The training images cut in two halves (fixed seed): calibration, selection."""
    order = np.random.default_rng(seed).permutation(pixels.count)
    half = pixels.count // 2
    if half < 1:
        raise UsageError(f"{pixels.count} training images: need at least 2 to split")
    return pixels.take(order[:half], batch_size), pixels.take(order[half:], batch_size)


def _candidate_key(c: dict[str, Any]) -> tuple[float, float, int]:
    sel = c["selection"]
    return (-sel["top1_agreement"], sel["median_abs"], c["calibration_images"])


@dataclass
class _Sets:
    """The images a candidate is judged on and FP32's logits on them."""

    calib: PixelBatches
    select: PixelBatches
    val: PixelBatches
    fp32_select: np.ndarray
    fp32_val: np.ndarray
    classes: list[str]


def _try_candidate(
    cfg: SearchConfig, sets: _Sets, prepared: Path, tmp: Path, i: int, choice: tuple
) -> dict[str, Any]:
    """Quantize with one (method, per_channel, count) and judge it: selection half, val."""
    from export.runners.onnxruntime import OnnxRuntimeRunner

    method, per_channel, count = choice
    n = count or sets.calib.count
    cal = Calibration(count=n, method=method, per_channel=per_channel)
    pixels = sets.calib.take(np.arange(min(n, sets.calib.count)), cfg.batch_size)
    path = tmp / f"int8-{i}.onnx"
    t0 = time.perf_counter()
    details = quantize_int8(prepared, path, cal, pixels, tmp / f"cal-{i}.json")
    seconds = time.perf_counter() - t0
    sel_logits = OnnxRuntimeRunner(path).logits(sets.select)
    sel = diff_stats(sets.fp32_select, sel_logits, "median")
    sel["accuracy"] = float((sel_logits.argmax(1) == sets.select.labels).mean())
    sel["reference_accuracy"] = float((sets.fp32_select.argmax(1) == sets.select.labels).mean())
    stage = judge(
        StageName.ONNXRUNTIME_INT8,
        StageName.ONNXRUNTIME_FP32,
        sets.fp32_val,
        OnnxRuntimeRunner(path).logits(sets.val),
        cfg.gate,
        labels=sets.val.labels,
        classes=sets.classes,
    )
    log.info(
        "%-10s per_channel=%-5s images=%-4d selection agree %.2f%%  val agree %.2f%% %s",
        method,
        per_channel,
        pixels.count,
        100 * sel["top1_agreement"],
        100 * (stage.top1_agreement or 0),
        stage.status,
    )
    selection_keys = ("images", "top1_agreement", "median_abs", "max_abs", "accuracy")
    return {
        "method": method,
        "per_channel": per_channel,
        "calibration_images": pixels.count,
        "reduce_range": details["reduce_range"],
        "quantize_seconds": round(seconds, 2),
        "selection": {k: sel[k] for k in (*selection_keys, "reference_accuracy")},
        "val": {
            "images": stage.images,
            "top1_agreement": stage.top1_agreement,
            "median_abs": stage.median_abs,
            "accuracy": stage.accuracy,
            "reference_accuracy": stage.reference_accuracy,
            "flips_break": stage.flips_break,
            "flips_fix": stage.flips_fix,
            "gate": stage.status,
            "reason": stage.reason,
        },
    }


def search(cfg: SearchConfig) -> dict[str, Any]:
    """Quantize with every candidate, judge on the selection half, report val too."""
    from export.checks.stage_outputs import load_pixels
    from export.runners.onnxruntime import OnnxRuntimeRunner
    from train.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(cfg.checkpoint)
    onnx = cfg.onnx or cfg.checkpoint.parent / "model.onnx"
    if not onnx.is_file():
        raise FileNotFoundError(f"{onnx}: no FP32 ONNX beside the checkpoint (run make export)")
    data = cfg.data or ckpt.config.get("data", "")
    train = load_pixels(ckpt, data, "train", cfg.batch_size, cfg.workers)
    val = load_pixels(ckpt, data, "val", cfg.batch_size, cfg.workers)
    calib, select = split_training(train, cfg.seed, cfg.batch_size)
    sets = _Sets(
        calib,
        select,
        val,
        OnnxRuntimeRunner(onnx).logits(select),
        OnnxRuntimeRunner(onnx).logits(val),
        list(ckpt.card.classes),
    )
    with tempfile.TemporaryDirectory(prefix="calibrate.") as tmp:
        prepared = preprocess_for_quantization(onnx, Path(tmp) / "prepared.onnx")
        grid = itertools.product(cfg.methods, cfg.per_channel, cfg.counts)
        candidates = [
            _try_candidate(cfg, sets, prepared, Path(tmp), i, choice)
            for i, choice in enumerate(grid)
        ]
    chosen = min(candidates, key=_candidate_key)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(),
        "cpu_vnni": cpu_has_vnni(),
        "onnxruntime": _ort_version(),
        "checkpoint": cfg.checkpoint.name,
        "model": ckpt.card.name,
        "arch": ckpt.card.arch,
        "rule": "choose by top-1 agreement with FP32 on the selection half of the training "
        "images, then median |diff|, then fewer calibration images; val is reported only",
        "training_images": {"calibration": calib.count, "selection": select.count},
        "val_images": val.count,
        "gate": dataclasses.asdict(cfg.gate),
        "agreement_floor": cfg.gate.agreement_floor(val.count),
        "candidates": candidates,
        "chosen": chosen,
        "export_args": export_args(chosen),
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def export_args(row: dict[str, Any]) -> str:
    """The ``EXPORT_ARGS`` that calibrate the export like ``row``."""
    pc = "" if row["per_channel"] else " --no-calibration-per-channel"
    return (
        f"--calibration-method {row['method']} --calibration-count {row['calibration_images']}{pc}"
    )


def plot(report: dict[str, Any], path: Path) -> Path:
    """Selection (training) vs val top-1 agreement per candidate; the chosen one marked."""
    import matplotlib.pyplot as plt

    from serve.core.plots import save_figure

    rows = report["candidates"]
    labels = [
        f"{r['method']}\n{'per-ch' if r['per_channel'] else 'per-tensor'}\n"
        f"{r['calibration_images']} img"
        for r in rows
    ]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.2))
    sel = [100 * r["selection"]["top1_agreement"] for r in rows]
    val = [100 * (r["val"]["top1_agreement"] or 0) for r in rows]
    ax.bar(x - 0.2, sel, 0.4, label="training selection half (chooses)")
    ax.bar(x + 0.2, val, 0.4, label="val (reported only)")
    floor = 100 * report["agreement_floor"]
    ax.axhline(floor, color="gray", ls="--", lw=1, label=f"val agreement floor {floor:.1f}%")
    bottom = max(0, min(sel + val) - 4)
    for k, r in enumerate(rows):  # the export gate's verdict on val, over each pair
        ok = r["val"]["gate"] == "passed"
        ax.annotate(
            "pass" if ok else "FAIL",
            (k, max(sel[k], val[k]) + 0.15),
            ha="center",
            fontsize=7,
            color="tab:green" if ok else "tab:red",
            weight="bold",
        )
    i = rows.index(report["chosen"])
    labels[i] = "CHOSEN\n" + labels[i]
    ax.set_xticks(x, labels, fontsize=7)
    ax.get_xticklabels()[i].set_weight("bold")
    ax.set_ylim(bottom, 101.2)
    ax.set_ylabel("top-1 agreement with FP32 (%)")
    ax.set_title(
        f"INT8 calibration choices: {report.get('model', '')} ({report['arch']}), "
        f"{report['machine']['cpu']}, {str(report.get('date', ''))[:10]}; "
        "pass/FAIL: the export gate on val"
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``python -m export calibrate``."""
    p.add_argument(
        "--checkpoint",
        default="runs/antsbees/checkpoint.pt",
        help="the run's checkpoint (classes, preprocessing, data)",
    )
    p.add_argument("--onnx", default="", help="FP32 ONNX (default: model.onnx beside it)")
    p.add_argument("--data", default="", help="dataset (default: the checkpoint's)")
    p.add_argument(
        "--out", default="bench/local", help="folder of int8-calibration-latest.json and .png"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(CALIBRATION_METHODS),
        help="ONNX Runtime calibration methods to try",
    )
    p.add_argument(
        "--counts", nargs="+", type=int, default=[32, 0], help="calibration images (0: all)"
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (the images)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the training images' split into calibration and selection halves",
    )


def config_from(a: argparse.Namespace) -> SearchConfig:
    """The SearchConfig the flags describe."""
    return SearchConfig(
        checkpoint=Path(a.checkpoint),
        onnx=Path(a.onnx) if a.onnx else None,
        data=a.data,
        out=Path(a.out),
        methods=tuple(a.methods),
        counts=tuple(a.counts),
        workers=a.workers,
        seed=a.seed,
    )


def run(a: argparse.Namespace) -> int:
    """Search, write the JSON and PNG, print the table and the chosen flags."""
    cfg = config_from(a)
    report = search(cfg)
    json_path = atomic_write_json(cfg.out / "int8-calibration-latest.json", report)
    png = plot(report, cfg.out / "int8-calibration-latest.png")
    print(table(report))
    c = report["chosen"]
    print(
        f"chosen on training images: {c['method']}, "
        f"{'per-channel' if c['per_channel'] else 'per-tensor'}, {c['calibration_images']} "
        f"images -> val gate {c['val']['gate']}"
        + (f" ({c['val']['reason']})" if c["val"]["reason"] else "")
    )
    print(f'make export PRECISION=int8 EXPORT_ARGS="{report["export_args"]}"')
    print(f"wrote {json_path}, {png}")
    return 0


def table(report: dict[str, Any]) -> str:
    """The docs table of a report (docs/export-and-parity.md)."""
    head = (
        "| method | weights | calib. images | selection agree (train) | val agree | "
        "val accuracy (FP32) | flips break/fix | gate |\n| --- | --- | ---: | ---: | ---: | "
        "---: | ---: | --- |"
    )
    lines = [head]
    for r in report["candidates"]:
        s, v = r["selection"], r["val"]
        mark = " **(chosen)**" if r == report["chosen"] else ""
        lines.append(
            f"| {r['method']}{mark} | {'per-channel' if r['per_channel'] else 'per-tensor'} | "
            f"{r['calibration_images']} | {100 * s['top1_agreement']:.2f}% | "
            f"{100 * v['top1_agreement']:.2f}% | {100 * v['accuracy']:.2f}% "
            f"({100 * v['reference_accuracy']:.2f}%) | {v['flips_break']}/{v['flips_fix']} | "
            f"{v['gate']} |"
        )
    return "\n".join(lines)
