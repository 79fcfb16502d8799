"""The export's building and judging steps: resolve the job, export ONNX (FP32, FP16),
run PyTorch FP32 on every val image (the reference the ledger holds), judge ONNX Runtime
and TensorRT against it, and build every ONNX with TensorRT-RTX. Each step takes what it
reads as arguments and returns what it makes (export/pipeline/release.py lists them)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from export.checks.stage_outputs import load_pixels
from export.checks.stages import REFERENCE, StageName
from export.formats.fp16 import convert_fp16
from export.formats.onnx_cache import OnnxCache
from export.formats.onnx_export import ExportedOnnx, export_onnx
from export.formats.tensorrt_engine import (
    TensorRTUnavailable,
    build_engine,
    tensorrt_status,
)
from export.formats.tensorrt_rtx import RtxBuild, import_rtx, rtx_build, rtx_capabilities
from export.pipeline.config import ExportConfig
from export.pipeline.job import ExportJob
from export.pipeline.ledger import Ledger
from export.pipeline.precision import Int8Export, check_int8, reduced_stage
from export.runners.onnxruntime import OnnxRuntimeRunner
from export.runners.pytorch import PyTorchRunner
from export.runners.tensorrt import TensorRTRunner
from serve.backend.errors import UsageError
from serve.core import hints
from serve.core.names import INPUT_NAME
from train.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def no_tensorrt(why: str) -> str:
    """Why TARGET=gpu with the tensorrt backend cannot go on here, and the ways out (in
    the form the user typed)."""
    return (
        f"TARGET=gpu with the tensorrt backend needs TensorRT and a GPU to build the "
        f"engine ({why}); build it on a GPU host (`python -m export trt`) and pass "
        f"{hints.flag('--engine PLAN')}, or use "
        f"{hints.flag('--gpu-backend onnxruntime', 'GPU_BACKEND', 'onnxruntime')}"
    )


def start(cfg: ExportConfig) -> ExportJob:
    """Validate, fail fast on a missing TensorRT, load the checkpoint, resolve paths."""
    cfg.validate()
    if cfg.serving.kind == "gpu-tensorrt" and not cfg.engine:
        ok, why = tensorrt_status()
        if not ok:
            raise TensorRTUnavailable(no_tensorrt(why))
    if cfg.trt_rtx_targets:  # an unknown compute capability is an error before any work
        try:
            rtx = import_rtx()
        except TensorRTUnavailable as e:
            log.warning("WARNING: %s; every TensorRT-RTX build will be recorded failed", e)
        else:
            rtx_capabilities(rtx, cfg.trt_rtx_targets)
    ckpt_path = Path(cfg.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    data = cfg.data or ckpt.config.get("data", "")
    if not data:
        raise UsageError("no --data given and the checkpoint records no data folder")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_path.parent
    return ExportJob(cfg, ckpt, cfg.name or ckpt.card.name, str(data), out_dir)


def export_models(job: ExportJob) -> ExportedOnnx:
    """ONNX (FP32) and its FP16 variant, written atomically into the run folder."""
    card = job.ckpt.card
    log.info(
        "exporting %s (%s, %d classes) -> %s",
        job.cfg.checkpoint,
        card.arch,
        card.num_classes,
        job.onnx_path,
    )
    for stale in job.out_dir.glob("localize-*"):  # an earlier export's failure report
        stale.unlink()
    cache = OnnxCache.resolve(job.cfg.onnx_cache)
    t = time.perf_counter()
    exported = export_onnx(
        job.ckpt,
        job.onnx_path,
        cache=cache,
        checkpoint_sha256=job.checkpoint_sha256 if cache else "",
    )
    if exported.cached:
        log.info(
            "ONNX graph reused from %s (same checkpoint, opset, torch, onnx; %.1fs); "
            "--onnx-cache off exports again",
            cache.path(exported.key) if cache else "",
            time.perf_counter() - t,
        )
    else:
        log.info("ONNX exported in %.1fs", time.perf_counter() - t)
    convert_fp16(job.onnx_path, job.fp16_path, keep_first_last_fp32=job.cfg.keep_fp16_edges)
    return exported


def reference_outputs(job: ExportJob) -> Ledger:
    """Every val image through the checkpoint's eval transform, and PyTorch FP32 on them:
    the ledger every later stage is judged in."""
    cfg = job.cfg
    pixels = load_pixels(
        job.ckpt, job.data, cfg.split, cfg.batch_size, cfg.workers, cfg.parity_limit
    )
    log.info("parity on %d %s images of %s", pixels.count, cfg.split, job.data)
    started = time.perf_counter()
    reference = PyTorchRunner(job.ckpt, REFERENCE).logits(pixels)
    ledger = Ledger(
        pixels=pixels,
        reference=reference,
        classes=job.ckpt.card.classes,
        reduced_gate=cfg.precision.gate,
        gating=job.gating,
    )
    ledger.seconds[REFERENCE] = time.perf_counter() - started
    return ledger


def check_onnxruntime(job: ExportJob, ledger: Ledger, int8: Int8Export) -> None:
    """ONNX Runtime FP32 (element-wise gate) and FP16 (accuracy gate, gating only when
    FP16 is published), then INT8 (:func:`export.pipeline.precision.check_int8`)."""
    fp32 = StageName.ONNXRUNTIME_FP32
    with ledger.timed(fp32):
        ort32 = OnnxRuntimeRunner(job.onnx_path, fp32).logits(ledger.pixels)
    ledger.compare(fp32, REFERENCE, ledger.reference, ort32, job.fp32_gate)
    fp16_stages = (StageName.ONNXRUNTIME_FP16, StageName.PYTORCH_FP16)
    if not job.cfg.fp16:
        for stage_name in fp16_stages:
            ledger.skip(stage_name, REFERENCE, "disabled (--no-fp16-stages)")
    else:
        if job.cfg.advisory == "sample" and not set(fp16_stages) <= job.gating:
            log.info(
                "advisory stages (not published) judged on a stratified sample of %d of %d "
                "images (seed 0); --advisory all judges every one",
                min(job.cfg.advisory_sample, ledger.pixels.count),
                ledger.pixels.count,
            )
        reduced_stage(job, ledger, OnnxRuntimeRunner(job.fp16_path, StageName.ONNXRUNTIME_FP16))
        reduced_stage(job, ledger, PyTorchRunner(job.ckpt, StageName.PYTORCH_FP16))
    check_int8(job, ledger, int8)


def check_tensorrt(job: ExportJob, ledger: Ledger) -> Path | None:
    """Build (or take) the engine and compare it; skipped with the reason elsewhere.
    Returns the engine to publish, if any. The engine is strongly typed: built from the
    INT8 Q/DQ graph (``PRECISION=int8``) or the accuracy-gated FP16 graph, so it computes
    in exactly the precision parity judged."""
    cfg = job.cfg
    wants_engine = cfg.serving.kind == "gpu-tensorrt"
    int8 = job.precision == "int8" and cfg.serving.target == "gpu"
    stage_name = StageName.TENSORRT_INT8 if int8 else StageName.TENSORRT_FP16
    engine = Path(cfg.engine) if cfg.engine else None
    ok, why = tensorrt_status()
    if not ok:
        if wants_engine and engine is None:
            raise TensorRTUnavailable(no_tensorrt(why))
        ledger.skip(stage_name, REFERENCE, f"{why}; runs on GPU hosts with TensorRT")
        return engine
    if engine is None:
        engine = job.out_dir / "model.plan"
        meta = build_engine(
            job.int8_trt_path if int8 else job.fp16_path,
            engine,
            cfg.profile,
            INPUT_NAME,
            job.ckpt.card.input.shape,
            cfg.timing_cache or None,
        )
        log.info(
            "built %s (%s, TensorRT %s, %s, %ss)",
            engine,
            meta["precision"],
            meta["tensorrt_version"],
            meta["gpu_name"],
            meta["build_seconds"],
        )
    logits = TensorRTRunner(engine, stage_name).logits(ledger.pixels)
    ledger.compare_reduced(stage_name, logits)
    return engine


def build_tensorrt_rtx(job: ExportJob, int8: Int8Export) -> list[RtxBuild]:
    """Every ONNX this export produced for TensorRT (FP32, FP16, the INT8 TensorRT
    flavour - the files parity judged, after the fallback) through TensorRT-RTX's parser
    and builder for ``trt_rtx_targets``; each build is recorded. Engines stay in
    ``<run>/tensorrt_rtx/``. A failed build of what ``TARGET=gpu`` serves fails the gate;
    any other failure is a loud warning."""
    cfg = job.cfg
    if not cfg.trt_rtx_targets:
        log.info("TensorRT-RTX builds off (--trt-rtx-targets none)")
        return []
    # The TensorRT inputs: the CPU's INT8 flavour (INT32 biases) is not one - TensorRT's
    # parser refuses it; its TensorRT flavour, model_int8_trt.onnx, is built instead.
    graphs = [(job.onnx_path, "fp32"), (job.fp16_path, "fp16")]
    if int8.built:
        graphs.append((job.int8_trt_path, "int8"))
    builds = []
    for path, precision in graphs:
        if not path.is_file():
            continue
        record = rtx_build(
            path,
            precision,
            cfg.trt_rtx_targets,
            cfg.profile,
            INPUT_NAME,
            job.ckpt.card.input.shape,
            job.out_dir / "tensorrt_rtx" / f"{path.stem}.engine",
        )
        builds.append(record)
        _log_rtx_build(record, required=precision == job.required_build_precision)
    return builds


def _log_rtx_build(record: RtxBuild, required: bool) -> None:
    if record.status == "built":
        log.info(
            "TensorRT-RTX built %s (%s, sm %s): %d bytes, %d layers %s, %.1fs",
            record.onnx,
            record.precision,
            "/".join(record.compute_capabilities),
            record.engine_bytes,
            record.layers,
            record.layer_types,
            record.seconds,
        )
    elif required:
        log.error(
            "TensorRT-RTX could not build %s (%s), the precision TARGET=gpu serves: %s",
            record.onnx,
            record.precision,
            record.reason,
        )
    else:
        log.warning(
            "WARNING: TensorRT-RTX could not build %s (%s): %s "
            "(TensorRT cannot serve this graph; the CPU target does not need it)",
            record.onnx,
            record.precision,
            record.reason,
        )
