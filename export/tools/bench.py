"""``python -m export bench`` (``make bench``): the serving benchmark of
``python -m serve bench`` plus the baselines that need torch, in one report.

In one run: the machine's GEMM peak (ONNX Runtime's MLAS and torch), ONNX Runtime and
PyTorch eager in-process, the bare TensorRT engine where there is one, then the Triton
sweep; every Triton figure is a ratio to in-process ONNX Runtime (and PyTorch).
Images come from the checkpoint's own val split unless ``--data`` names a folder.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve.core.flags import Flag, add_flags, build
from serve.core.machine import gemm_gflops_onnxruntime
from serve.tools import bench as serve_bench
from serve.tools.bench_config import BENCH_FLAGS, BenchConfig, add_bench_flags
from serve.tools.bench_inputs import onnxruntime_baseline
from serve.tools.bench_report import write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportBenchConfig(BenchConfig):
    """``python -m serve bench``'s settings plus the baselines that need torch."""

    checkpoint: str = ""
    onnx_baselines: tuple[str, ...] | None = None
    engine: str = ""


EXPORT_FLAGS = [
    Flag(
        "checkpoint",
        "--checkpoint",
        "the run's checkpoint (PyTorch baseline; default runs/<model>/checkpoint.pt)",
    ),
    Flag(
        "onnx_baselines",
        "--onnx-baselines",
        "more in-process ONNX Runtime rows (e.g. FP32 beside an INT8 version), each "
        "with the precision its graph records (default: the run folder's model.onnx and "
        "model_int8.onnx, unless identical to the served one)",
        {"nargs": "*", "metavar": "ONNX"},
    ),
    Flag(
        "engine",
        "--engine",
        "TensorRT engine for the bare-engine baseline (default: the version's plan for this GPU)",
    ),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_bench_flags(p, ExportBenchConfig)
    add_flags(p, ExportBenchConfig, EXPORT_FLAGS)


def precision_of(path: Path) -> str:
    """The precision an exported graph records (``fp32`` when it records none)."""
    from export.formats.onnx_export import read_metadata

    return read_metadata(path).get("precision", "fp32")


def onnx_baselines(given: Sequence[str] | None, run_dir: Path, version_dir: Path) -> list[Path]:
    """The extra in-process rows: ``given``, or the run's FP32 and INT8 graphs that differ
    from the served ``model.onnx``."""
    from serve.core.files import sha256

    if given is not None:
        return [Path(p) for p in given]
    served = version_dir / "model.onnx"
    served_sha = sha256(served) if served.is_file() else ""
    candidates = [run_dir / "model.onnx", run_dir / "model_int8.onnx"]
    return [p for p in candidates if p.is_file() and sha256(p) != served_sha]


def engine_baseline(cfg: ExportBenchConfig, version_dir: Path, pixels: Any) -> Any:
    """The bare-engine row for ``--engine`` or the version's plan that runs on this GPU
    (``model.sm<cc>.plan`` per compute capability, ``model.plan`` hardware-compatible);
    else the reasons, recorded as skipped."""
    from export.tools.baselines import tensorrt_baseline

    plans = [Path(cfg.engine)] if cfg.engine else sorted(version_dir.glob("model*.plan"))
    if not plans:
        return f"no TensorRT engine in {version_dir} (a CPU repository has none)"
    reasons = []
    for plan in plans:
        row = tensorrt_baseline(plan, pixels, cfg.batch, cfg.window, cfg.max_seconds)
        if not isinstance(row, str):
            return row
        reasons.append(row)
    return "; ".join(reasons)


def run(args: argparse.Namespace) -> int:
    """``python -m export bench``: :func:`bench` on the config the flags describe."""
    return bench(build(ExportBenchConfig, args, [*BENCH_FLAGS, *EXPORT_FLAGS]))


def bench(cfg: ExportBenchConfig) -> int:
    """Baselines + the Triton sweep, written as <out>/<model>-latest.json/.png."""
    from export.tools.baselines import gemm_gflops_torch, pytorch_baseline  # torch: here only
    from train.models.checkpoint import load_checkpoint

    ckpt_path = Path(cfg.checkpoint or f"runs/{cfg.model}/checkpoint.pt")
    ckpt = load_checkpoint(ckpt_path)
    data = cfg.data or str(Path(ckpt.config.get("data", "")) / "val")
    gemm = {"onnxruntime": gemm_gflops_onnxruntime(), "torch": gemm_gflops_torch()}
    inputs, report, ort = serve_bench.baseline_report(cfg, data, gemm)
    for path in onnx_baselines(cfg.onnx_baselines, ckpt_path.parent, inputs.version_dir):
        row = onnxruntime_baseline(
            path, inputs.pixels, cfg.batch, cfg.window, cfg.max_seconds, precision_of(path)
        )
        row.ratio_to_onnxruntime = row.throughput / ort.throughput
        report["results"].append({**asdict(row), "onnx": path.name})
        log.info("onnxruntime %s in-process (%s): %.1f img/s", row.precision, path, row.throughput)
    pt = pytorch_baseline(ckpt, inputs.pixels, cfg.batch, cfg.window, cfg.max_seconds)
    pt.ratio_to_onnxruntime = pt.throughput / ort.throughput
    report["results"].append(asdict(pt))
    log.info("pytorch eager in-process: %.1f img/s", pt.throughput)
    engine = engine_baseline(cfg, inputs.version_dir, inputs.pixels)
    if isinstance(engine, str):
        report["skipped"]["tensorrt"] = engine
    else:
        report["results"].append(asdict(engine))
    for lv in serve_bench.sweep(cfg, inputs, ort, report):
        lv.ratio_to_pytorch = lv.throughput / pt.throughput
        report["results"].append(asdict(lv))
    paths = write_report(report, Path(cfg.out), cfg.model)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
