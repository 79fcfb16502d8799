"""The export run: checkpoint -> ONNX (FP32, FP16, INT8) [-> TensorRT engine] -> parity of
every stage on every val image -> TensorRT-RTX builds of every ONNX -> report -> publish
when every gating stage passed -> deploy to a live server when asked (``--deploy URL``).

:func:`run_export` is the list of its steps; each step reads and extends one
:class:`ExportRun`.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.fp16 import convert_fp16, pytorch_fp16_logits
from export.onnx_cache import OnnxCache
from export.onnx_export import export_onnx, exported_card
from export.precision import (
    check_int8,
    export_int8,
    precision_details,
    served_stage,
)
from export.precision_fallback import fallback_step, speed_gate
from export.publish import Published, publish
from export.report import write_histogram, write_json, write_markdown
from export.run_state import ExportConfig, ExportRun
from export.stage_outputs import (
    encoded_images,
    load_pixels,
    onnxruntime_logits,
    pytorch_logits,
)
from export.tensorrt_engine import (
    TensorRTUnavailable,
    build_engine,
    import_rtx,
    rtx_build,
    rtx_capabilities,
    tensorrt_logits,
    tensorrt_status,
)
from export.warmup import val_images
from serve.core.cli_common import GateRefused
from serve.core.contract import INPUT_NAME, OUTPUT_NAME, ParitySummary
from serve.core.errors import UsageError
from train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

NO_TENSORRT = (
    "TARGET=gpu with the tensorrt backend needs TensorRT and a GPU to build the "
    "engine ({why}); build it on a GPU host (`python -m export trt`) and pass "
    "--engine, or use --gpu-backend onnxruntime"
)


class ParityFailed(GateRefused):
    """A gating stage missed its threshold and publishing was refused (exit 3)."""


# -- the steps -------------------------------------------------------------------------------
def start(cfg: ExportConfig) -> ExportRun:
    """Validate, fail fast on a missing TensorRT, load the checkpoint, resolve paths."""
    cfg.validate()
    if cfg.serving.kind == "gpu-tensorrt" and not cfg.engine:
        ok, why = tensorrt_status()
        if not ok:
            raise TensorRTUnavailable(NO_TENSORRT.format(why=why))
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
    return ExportRun(cfg, ckpt, cfg.name or ckpt.card.name, str(data), out_dir)


def export_models(run: ExportRun) -> None:
    """ONNX (FP32) and its FP16 variant, written atomically into the run folder."""
    card = run.ckpt.card
    log.info(
        "exporting %s (%s, %d classes) -> %s",
        run.cfg.checkpoint,
        card.arch,
        card.num_classes,
        run.onnx_path,
    )
    cache = OnnxCache.resolve(run.cfg.onnx_cache)
    t = time.perf_counter()
    exported = export_onnx(
        run.ckpt,
        run.onnx_path,
        cache=cache,
        checkpoint_sha256=run.checkpoint_sha256 if cache else "",
    )
    if exported.cached:
        run.onnx_cached = exported.key
        log.info(
            "ONNX graph reused from %s (same checkpoint, opset, torch, onnx; %.1fs); "
            "--onnx-cache off exports again",
            cache.path(exported.key) if cache else "",
            time.perf_counter() - t,
        )
    else:
        log.info("ONNX exported in %.1fs", time.perf_counter() - t)
    convert_fp16(run.onnx_path, run.fp16_path, keep_first_last_fp32=run.cfg.keep_fp16_edges)


def reference_outputs(run: ExportRun) -> None:
    """Every val image through the checkpoint's eval transform, and PyTorch FP32 on them."""
    cfg = run.cfg
    run.pixels = load_pixels(
        run.ckpt, run.data, cfg.split, cfg.batch_size, cfg.workers, cfg.parity_limit
    )
    log.info("parity on %d %s images of %s", run.pixels.count, cfg.split, run.data)
    run.reference = pytorch_logits(run.ckpt, run.pixels)


def check_onnxruntime(run: ExportRun) -> None:
    """ONNX Runtime FP32 (element-wise gate) and FP16 (accuracy gate, gating only when
    FP16 is published), then INT8 (:func:`check_int8`)."""
    assert run.pixels is not None and run.reference is not None
    run.ort32 = onnxruntime_logits(run.onnx_path, run.pixels)
    run.compare("onnxruntime-fp32", "pytorch-fp32", run.reference, run.ort32, run.fp32_gate)
    if not run.cfg.fp16:
        for stage_name in ("onnxruntime-fp16", "pytorch-fp16"):
            run.skip(stage_name, "pytorch-fp32", "disabled (--no-fp16-stages)")
    else:
        run.compare_reduced("onnxruntime-fp16", onnxruntime_logits(run.fp16_path, run.pixels))
        half, _ = pytorch_fp16_logits(run.ckpt, run.pixels, run.cfg.fp16_limit)
        run.compare_reduced("pytorch-fp16", half)
    check_int8(run)


def check_tensorrt(run: ExportRun) -> None:
    """Build (or take) the engine and compare it; skipped with the reason elsewhere. The
    engine is strongly typed: built from the INT8 Q/DQ graph (``PRECISION=int8``) or the
    accuracy-gated FP16 graph, so it computes in exactly the precision parity judged."""
    cfg = run.cfg
    assert run.pixels is not None and run.reference is not None
    wants_engine = cfg.serving.kind == "gpu-tensorrt"
    int8 = cfg.precision.precision == "int8" and cfg.serving.target == "gpu"
    stage_name = "tensorrt-int8" if int8 else "tensorrt-fp16"
    run.engine = Path(cfg.engine) if cfg.engine else None
    ok, why = tensorrt_status()
    if not ok:
        if wants_engine and run.engine is None:
            raise TensorRTUnavailable(NO_TENSORRT.format(why=why))
        run.skip(stage_name, "pytorch-fp32", f"{why}; runs on GPU hosts with TensorRT")
        return
    if run.engine is None:
        run.engine = run.out_dir / "model.plan"
        meta = build_engine(
            run.int8_trt_path if int8 else run.fp16_path,
            run.engine,
            cfg.profile,
            INPUT_NAME,
            run.ckpt.card.input.shape,
            cfg.timing_cache or None,
        )
        log.info(
            "built %s (%s, TensorRT %s, %s, %ss)",
            run.engine,
            meta["precision"],
            meta["tensorrt_version"],
            meta["gpu_name"],
            meta["build_seconds"],
        )
    logits = tensorrt_logits(run.engine, run.pixels.batches, INPUT_NAME, OUTPUT_NAME)
    run.compare_reduced(stage_name, logits)


def build_tensorrt_rtx(run: ExportRun) -> None:
    """Every ONNX this export produced for TensorRT (FP32, FP16, the INT8 TensorRT
    flavour - the files parity judged, after the fallback) through TensorRT-RTX's parser
    and builder for ``trt_rtx_targets``; each build is recorded. Engines stay in
    ``<run>/tensorrt_rtx/``. A failed build of what ``TARGET=gpu`` serves fails the gate;
    any other failure is a loud warning."""
    cfg = run.cfg
    if not cfg.trt_rtx_targets:
        log.info("TensorRT-RTX builds off (--trt-rtx-targets none)")
        return
    # The TensorRT inputs: the CPU's INT8 flavour (INT32 biases) is not one - TensorRT's
    # parser refuses it; its TensorRT flavour, model_int8_trt.onnx, is built instead.
    graphs = [(run.onnx_path, "fp32"), (run.fp16_path, "fp16")]
    if cfg.precision.int8 and not run.int8_skipped:
        graphs.append((run.int8_trt_path, "int8"))
    for path, precision in graphs:
        if not path.is_file():
            continue
        record = rtx_build(
            path,
            precision,
            cfg.trt_rtx_targets,
            cfg.profile,
            INPUT_NAME,
            run.ckpt.card.input.shape,
            run.out_dir / "tensorrt_rtx" / f"{path.stem}.engine",
        )
        run.rtx_builds.append(record)
        if record.status == "built":
            log.info(
                "TensorRT-RTX built %s (%s, sm %s): %d bytes, %d layers %s, %.1fs",
                record.onnx,
                precision,
                "/".join(record.compute_capabilities),
                record.engine_bytes,
                record.layers,
                record.layer_types,
                record.seconds,
            )
        elif precision == run.required_build_precision:
            log.error(
                "TensorRT-RTX could not build %s (%s), the precision TARGET=gpu serves: %s",
                record.onnx,
                precision,
                record.reason,
            )
        else:
            log.warning(
                "WARNING: TensorRT-RTX could not build %s (%s): %s "
                "(TensorRT cannot serve this graph; the CPU target does not need it)",
                record.onnx,
                precision,
                record.reason,
            )


def make_card(run: ExportRun) -> None:
    """The card to publish: the checkpoint's, as exported, with provenance by name and
    hash (no machine-local path), cost per image and the parity summary."""
    from export.baselines import model_gflops

    ckpt_path = Path(run.cfg.checkpoint)
    card = exported_card(run.ckpt)
    provenance = dataclasses.replace(
        card.provenance, checkpoint=ckpt_path.name, checkpoint_sha256=run.checkpoint_sha256
    )
    run.card = card.replace(
        name=run.name,
        provenance=provenance,
        gflop_per_image=round(model_gflops(run.ckpt), 4),
        precision=run.cfg.precision.precision,
        precision_details=precision_details(run),
    )


def publish_into(run: ExportRun, repo: Path) -> Published:
    assert run.card is not None
    count = len(run.cfg.serving.warmup_batch_sizes)
    images = val_images(run.ckpt, run.data, run.cfg.split, count)
    return publish(
        repo,
        run.name,
        run.served_onnx,
        run.card,
        run.cfg.serving,
        run.engine,
        warmup_images=images,
    )


def check_triton(run: ExportRun) -> None:
    """The published version through a real tritonserver, over HTTP and gRPC, and the
    raw-image ensemble (CPU targets; the bundled server has only the python backend)."""
    cfg = run.cfg
    assert run.pixels is not None and run.ort32 is not None
    names = ("triton-http", "triton-grpc", "triton-image")
    # The server runs the served model with ONNX Runtime: it must return exactly that.
    served = served_stage(cfg.precision.precision)
    served_logits = run.ort32 if served == "onnxruntime-fp32" else run.logits[served]
    if not cfg.triton_parity or cfg.serving.target != "cpu":
        reason = (
            "disabled (--no-triton-parity)"
            if not cfg.triton_parity
            else "the bundled tritonserver has only the python backend; serve the GPU "
            "repository with the NGC container (serve/deploy/docker-compose.gpu.yml)"
        )
        for stage_name in names:
            run.skip(stage_name, served, reason)
        return
    from export.triton_parity import triton_logits

    images = encoded_images(run.ckpt, run.data, cfg.split, cfg.parity_limit)
    outputs = triton_logits(lambda repo: publish_into(run, repo), run.name, run.pixels, images)
    for key, logits in outputs.items():
        run.compare(f"triton-{key}", served, served_logits, logits, run.fp32_gate)


def write_reports(run: ExportRun) -> None:
    """parity.json, parity.md, parity.png in the run folder (local paths are fine there)."""
    import onnx
    import onnxruntime
    import torch

    assert run.pixels is not None and run.reference is not None and run.card is not None
    cfg = run.cfg
    run.report = {
        "model": run.name,
        "checkpoint": str(cfg.checkpoint),
        "checkpoint_sha256": run.card.provenance.checkpoint_sha256,
        "onnx": str(run.onnx_path),
        "onnx_from_cache": run.onnx_cached or None,
        "onnx_fp16": str(run.fp16_path),
        "onnx_int8": str(run.int8_path) if cfg.precision.int8 and not run.int8_skipped else None,
        "onnx_int8_tensorrt": (
            str(run.int8_trt_path) if cfg.precision.int8 and not run.int8_skipped else None
        ),
        "precision": cfg.precision.precision,
        "gates": {
            "fp32": dataclasses.asdict(run.fp32_gate),
            "reduced_precision": dataclasses.asdict(cfg.precision.gate),
            "reduced_precision_elementwise_advisory": dataclasses.asdict(run.fp16_gate),
        },
        "precision_details": run.card.precision_details,
        "engine": str(run.engine) if run.engine else None,
        "target": cfg.serving.kind,
        "data": run.data,
        "split": cfg.split,
        "images": run.pixels.count,
        "reference_top1": float((run.reference.argmax(1) == run.pixels.labels).mean()),
        "passed": run.passed,
        "forced": bool(cfg.force and not run.passed),
        "stages": [s.to_dict() for s in run.stages],
        "tensorrt_builds": [b.to_dict() for b in run.rtx_builds],
        "versions": {
            "torch": str(torch.__version__),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }
    write_json(run.report, run.out_dir / "parity.json")
    write_markdown(run.report, run.out_dir / "parity.md")
    write_histogram(run.stages, run.diffs, run.out_dir / "parity.png")
    log.info("wrote %s/parity.json, parity.md, parity.png", run.out_dir)


def gate(run: ExportRun) -> None:
    """Refuse to publish when a gating stage failed (unless --force)."""
    if run.passed or run.cfg.force:
        return
    failed = [s for s in run.stages if s.status == "failed"]
    reasons = "; ".join(
        [f"{s.name}: {s.reason}" for s in failed]
        + [
            f"TensorRT-RTX build of {b.onnx} ({b.precision}) failed: {b.reason}"
            for b in run.failed_required_builds
        ]
    )
    raise ParityFailed(
        f"parity failed, not publishing ({reasons}); see {run.out_dir / 'parity.md'}"
    )


def publish_release(run: ExportRun) -> None:
    """The next version in the repository, its card holding the parity summary."""
    if not run.cfg.publish:
        return
    assert run.card is not None
    summary = ParitySummary(
        passed=run.report["passed"],
        forced=run.report["forced"],
        images=run.report["images"],
        reference_accuracy=run.report["reference_top1"],
        stages=run.report["stages"],
    )
    run.card = run.card.replace(parity=summary)
    run.published = publish_into(run, Path(run.cfg.repository))
    target = run.published.classifier
    run.report["published"] = str(target)
    log.info(
        "published %s version %s (%s) -> %s", run.name, target.name, run.cfg.serving.kind, target
    )
    if run.report["forced"]:
        log.warning("WARNING: published despite failed parity (--force); recorded in the card")


def deploy_release(run: ExportRun) -> None:
    """With ``--deploy URL``: load the new version on that server and record its served
    accuracy in the card. Never implied by a port that happens to answer."""
    if not run.cfg.deploy or run.published is None:
        return
    from export.deploy import deploy_and_measure

    served = deploy_and_measure(
        run.cfg.deploy,
        run.name,
        run.published.classifier,
        run.data,
        run.cfg.split,
        run.report["reference_top1"],
        run.cfg.admin_key_file or None,
    )
    run.report["served"] = served
    log.info("deployed to %s: %s", run.cfg.deploy, served.get("note") or served["status"])


STEPS: list[Callable[[ExportRun], None]] = [
    export_models,
    reference_outputs,
    export_int8,
    check_onnxruntime,
    fallback_step,
    speed_gate,
    check_tensorrt,
    build_tensorrt_rtx,
    make_card,
    check_triton,
    write_reports,
    gate,
    publish_release,
    deploy_release,
]


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Run every step; returns the report. Raises ParityFailed (after writing the report)
    when a gating stage failed and ``force`` is off."""
    run = start(cfg)
    for step in STEPS:
        step(run)
    return run.report
