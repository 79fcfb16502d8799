"""``python -m export profile`` (``make profile``): every in-process runtime across batch
sizes, what ``max_batch_size`` and the batching delay are chosen from.

For each runtime the export judged (PyTorch FP32 from the run's checkpoint; ONNX Runtime
on the bundle's FP32, FP16 and INT8 graphs; a TensorRT plan with ``--engine`` on GPU
hosts) and each batch size (1, 2, 4, ..., 64), the same real val images from the parity
bundle run repeatedly: median and p90 latency per batch, images/s, and the batch each
runtime saturates at (the smallest within 5% of its best images/s). Writes
``<out>/<model>-batch-sweep.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.checks.bundle import Bundle
from export.checks.stages import REFERENCE, PixelBatches, StageName
from export.runners.onnxruntime import OnnxRuntimeRunner
from export.runners.runner import Runner
from serve.backend.errors import UsageError

log = logging.getLogger(__name__)

BATCHES = (1, 2, 4, 8, 16, 32, 64)
SATURATION = 0.95  # within 5% of the best images/s


def runners(
    bundle: Bundle, checkpoint: Path | None, engine: Path | None, threads: int
) -> dict[str, Runner]:
    """Each runtime to sweep, by stage name (``tensorrt`` for a plan); each loads its
    model on first use, when it is swept."""
    out: dict[str, Runner] = {}
    if checkpoint is not None and checkpoint.is_file():
        from export.runners.pytorch import PyTorchRunner
        from train.models.checkpoint import load_checkpoint

        out[REFERENCE] = PyTorchRunner(load_checkpoint(checkpoint), REFERENCE, threads)
    seen: set[Path] = set()
    for stage in (
        StageName.ONNXRUNTIME_FP32,
        StageName.ONNXRUNTIME_FP16,
        StageName.ONNXRUNTIME_INT8,
    ):
        path = bundle.model_path(stage) if stage in bundle.stages else None
        if path is not None and path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            out[stage] = OnnxRuntimeRunner(path, stage, threads)
    if engine is not None:
        from export.runners.tensorrt import TensorRTRunner

        out["tensorrt"] = TensorRTRunner(engine, StageName.TENSORRT_FP16)
    return out


def time_batch(
    run: Callable[[np.ndarray], Any], x: np.ndarray, seconds: float, min_runs: int = 3
) -> dict[str, float]:
    """Median and p90 latency of ``run(x)`` after one warmup call, over at least
    ``min_runs`` calls and ``seconds`` of running."""
    run(x)
    times: list[float] = []
    begun = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - begun < seconds and len(times) < 500):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    median = float(np.median(times))
    return {
        "batch": len(x),
        "runs": len(times),
        "median_ms": round(1e3 * median, 3),
        "p90_ms": round(1e3 * float(np.percentile(times, 90)), 3),
        "images_per_s": round(len(x) / median, 2),
    }


def saturation(rows: list[dict[str, float]]) -> int:
    """The smallest batch whose images/s is within 5% of the best."""
    best = max(r["images_per_s"] for r in rows)
    return int(next(r["batch"] for r in rows if r["images_per_s"] >= SATURATION * best))


def sweep(
    runners: dict[str, Runner],
    pixels: np.ndarray,
    batches: tuple[int, ...],
    seconds: float,
) -> dict[str, dict[str, Any]]:
    """Every runtime at every batch size (images tiled from ``pixels``)."""
    from train.run.progress import progress

    results: dict[str, dict[str, Any]] = {}
    for name, runner in runners.items():

        def run(x: np.ndarray, runner: Runner = runner) -> np.ndarray:
            return runner.logits(PixelBatches.of(x, batch=len(x)))

        rows = []
        for b in progress(batches, desc=f"{name} batch sweep"):
            x = np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:])), np.float32)
            rows.append(time_batch(run, x, seconds))
        results[name] = {"rows": rows, "saturates_at": saturation(rows)}
        log.info(
            "%s: %s; saturates at batch %d",
            name,
            ", ".join(f"b{r['batch']} {r['images_per_s']:.1f} img/s" for r in rows),
            results[name]["saturates_at"],
        )
    return results


def plot(report: dict[str, Any], path: Path) -> None:
    """Images/s and latency per batch size, one line per runtime."""
    from serve.core.plots import plt, save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = "osD^vP*X"
    for k, (name, r) in enumerate(report["runtimes"].items()):
        b = [row["batch"] for row in r["rows"]]
        m = markers[k % len(markers)]
        ax1.plot(b, [row["images_per_s"] for row in r["rows"]], marker=m, label=name)
        ax1.plot(
            [r["saturates_at"]],
            [next(x["images_per_s"] for x in r["rows"] if x["batch"] == r["saturates_at"])],
            marker="o",
            ms=14,
            mfc="none",
            color=ax1.lines[-1].get_color(),
        )
        ax2.plot(b, [row["median_ms"] for row in r["rows"]], marker=m, label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["batches"], [str(b) for b in report["batches"]])
        ax.grid(alpha=0.3)
        ax.set_xlabel("batch size")
    ax1.set(ylabel="images/s", title="throughput (circled: saturation, within 5% of best)")
    ax2.set(yscale="log", ylabel="median latency per batch (ms)", title="latency")
    ax1.legend(fontsize=8)
    fig.suptitle(f"{report['model']}: in-process batch sweep ({report['cpu']})", fontsize=10)
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run folder (runs/<model>) or a parity bundle")
    p.add_argument("--checkpoint", default="", help="PyTorch's checkpoint (default: the run's)")
    p.add_argument("--engine", default="", help="a TensorRT plan to sweep too (GPU hosts)")
    p.add_argument(
        "--batches", default=",".join(map(str, BATCHES)), help="batch sizes, comma-separated"
    )
    p.add_argument("--seconds", type=float, default=1.0, help="time spent per runtime and batch")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    p.add_argument("--out", default="bench/local", help="folder for the JSON and the plot")


def run(a: argparse.Namespace) -> int:
    """The ``profile`` command."""
    from serve.core.files import atomic_write_json
    from serve.core.machine import cpu_model

    bundle = Bundle.load(a.run)
    try:
        batches = tuple(sorted({int(b) for b in a.batches.split(",") if b.strip()}))
    except ValueError as e:
        raise UsageError(f"--batches: comma-separated integers, got {a.batches!r}") from e
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches: sizes of 1 or more, got {a.batches!r}")
    checkpoint = Path(a.checkpoint) if a.checkpoint else bundle.path.parent / "checkpoint.pt"
    found = runners(bundle, checkpoint, Path(a.engine) if a.engine else None, a.threads)
    if not found:
        raise UsageError(f"nothing to sweep in {bundle.path}")
    pixels, _labels, _names = bundle.inputs()
    results = sweep(found, pixels, batches, a.seconds)
    for r in results.values():
        r["best_images_per_s"] = max(row["images_per_s"] for row in r["rows"])
    report = {
        "model": bundle.meta["model"],
        "cpu": cpu_model(),
        "threads": a.threads or "one per core",
        "batches": list(batches),
        "seconds_per_point": a.seconds,
        "date": time.strftime("%Y-%m-%d"),
        "runtimes": results,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['model']}-batch-sweep"
    atomic_write_json(stem.with_suffix(".json"), report)
    plot(report, stem.with_suffix(".png"))
    width = max(len(n) for n in results)
    print(
        f"{'runtime':<{width}} " + " ".join(f"{'b' + str(b):>9}" for b in batches) + "  saturates"
    )
    for name, r in results.items():
        cells = " ".join(f"{row['images_per_s']:9.1f}" for row in r["rows"])
        print(f"{name:<{width}} {cells}  b{r['saturates_at']}")
    print(f"images/s; wrote {stem}.json and .png")
    return 0
