"""Reduced precision as release steps: the INT8 model, the accuracy-gated FP16/INT8
stages, which of them gate publishing, and what the card records.

Which reduced stage gates depends on what is published:

* ``TARGET=cpu PRECISION=fp32``: none (FP16/INT8 stages are reported, advisory);
* ``TARGET=cpu PRECISION=int8``: ``onnxruntime-int8`` (the served ``model.onnx`` is the
  INT8 graph); ``PRECISION=fp16``: ``onnxruntime-fp16`` (the FP16 graph, FP32 I/O);
* ``TARGET=gpu``: the FP16 stages (TensorRT FP16 engine), or ``tensorrt-int8`` with
  ``PRECISION=int8``.

Every reduced stage is judged by :class:`export.checks.parity.AccuracyGate` against
``pytorch-fp32`` over every image; a gating one that fails goes to the precision
fallback (:mod:`export.pipeline.precision_fallback`) when enabled.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.checks.stage_outputs import load_pixels
from export.checks.stages import REFERENCE, StageName
from export.formats.int8 import metadata_of, preprocess_for_quantization, quantize_int8
from export.pipeline.job import ExportJob
from export.pipeline.ledger import Ledger
from export.runners.onnxruntime import OnnxRuntimeRunner
from export.runners.runner import Runner
from serve.backend.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Export:
    """What :func:`export_int8` made: ``built`` when model_int8.onnx (and its TensorRT
    flavour) exist; ``skipped`` says why not when it was asked for; ``details`` is the
    calibration the card records."""

    built: bool = False
    skipped: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def served_stage(precision: str) -> StageName:
    """The stage whose model is the served ``model.onnx`` on CPU."""
    return StageName(f"onnxruntime-{precision}")


def calibration_data(job: ExportJob) -> str:
    """Where INT8 calibration (and the fallback's sensitivity probe) read training images."""
    pc = job.cfg.precision
    return str(pc.calibration_data or job.ckpt.config.get("data", "") or job.data)


def export_int8(job: ExportJob) -> Int8Export:
    """Calibrate on training images (eval transform) and write ``model_int8.onnx`` and its
    TensorRT flavour ``model_int8_trt.onnx``."""
    pc = job.cfg.precision
    if not pc.int8:
        return Int8Export()
    if pc.precision != "int8" and job.cfg.advisory != "all":
        # advisory: it decides nothing here, and calibrating is most of an export's time
        return Int8Export(
            skipped="advisory (INT8 is not published): not quantized; PRECISION=int8 "
            "publishes it if it passes, --advisory all reports it"
        )
    cal = pc.calibration
    data = calibration_data(job)
    if Path(data).suffix == ".npz" and Path(data).resolve() == Path(job.data).resolve():
        why = (
            f"INT8 calibration would use {data}, the file the gate judges: pass "
            "--calibration-data with the training images"
        )
        if pc.precision == "int8":
            raise UsageError(why)
        log.warning("INT8 stage skipped: %s", why)  # INT8 is only reported: FP32 goes on
        return Int8Export(skipped=why)
    pixels = load_pixels(job.ckpt, data, cal.split, cal.batch_size, job.cfg.workers, cal.count)
    prepared = preprocess_for_quantization(job.onnx_path, job.out_dir / "model_prepared.onnx")
    cache = job.out_dir / "int8_calibration.json"
    cache.unlink(missing_ok=True)  # ranges of this model and these images only
    meta = metadata_of(job.onnx_path)
    details = quantize_int8(prepared, job.int8_path, cal, pixels, cache, metadata=meta)
    # The TensorRT flavour (symmetric, float biases) from the same calibration ranges.
    trt = quantize_int8(prepared, job.int8_trt_path, cal, None, cache, metadata=meta, tensorrt=True)
    return Int8Export(
        built=True,
        details={
            **details,
            "tensorrt_flavour": {
                "file": job.int8_trt_path.name,
                **{k: trt[k] for k in ("activation_type", "symmetric", "bias", "quantized_nodes")},
            },
            "calibration_data": Path(data).name,
            "calibration_split": cal.split,
            "calibration_images": pixels.count,
            "calibration_batch_size": cal.batch_size,
        },
    )


def reduced_stage(job: ExportJob, ledger: Ledger, runner: Runner) -> None:
    """Judge the reduced-precision stage ``runner`` runs: on every val image when it
    gates publishing (or ``--advisory all``); an advisory one on a stratified sample of
    ``--advisory-sample`` images (``sample``, the default) or not at all (``off``): it
    decides nothing, so it costs little."""
    cfg = job.cfg
    name = runner.stage
    indices = None
    if name not in ledger.gating and cfg.advisory != "all":
        if cfg.advisory == "off":
            ledger.skip(name, REFERENCE, "advisory (not published): --advisory off")
            return
        indices = ledger.sample(cfg.advisory_sample)
    with ledger.timed(name):
        out = runner.logits(ledger.pixels_of(indices))
    ledger.compare_reduced(name, out, indices)


def check_int8(job: ExportJob, ledger: Ledger, int8: Int8Export) -> None:
    """``onnxruntime-int8`` vs ``pytorch-fp32``, accuracy-gated (gating for INT8 on CPU),
    and the TensorRT flavour's accuracy with ONNX Runtime (advisory; on GPU the
    ``tensorrt-int8`` stage judges its engine)."""
    if not int8.built:
        why = int8.skipped or "disabled (--no-int8-stage)"
        ledger.skip(StageName.ONNXRUNTIME_INT8, REFERENCE, why)
        ledger.skip(StageName.ONNXRUNTIME_INT8_TENSORRT, REFERENCE, why)
        return
    reduced_stage(job, ledger, OnnxRuntimeRunner(job.int8_path, StageName.ONNXRUNTIME_INT8))
    trt_flavour = StageName.ONNXRUNTIME_INT8_TENSORRT
    reduced_stage(job, ledger, OnnxRuntimeRunner(job.int8_trt_path, trt_flavour))


def precision_details(
    job: ExportJob,
    ledger: Ledger,
    int8: Int8Export,
    fallback: dict[str, list[str]],
    int8_speed: dict[str, Any] | None,
) -> dict[str, Any]:
    """What the card records about the published precision: the gate, its numbers, the
    calibration, the nodes the fallback kept in FP32 and the speed gate's figures (INT8)."""
    pc = job.cfg.precision
    details: dict[str, Any] = {"precision": pc.precision, "gate": dataclasses.asdict(pc.gate)}
    if pc.precision == "fp32":
        return details
    details["stages"] = {
        s.name: {
            "status": s.status,
            "top1_agreement": s.top1_agreement,
            "accuracy": s.accuracy,
            "reference_accuracy": s.reference_accuracy,
            "accuracy_drop": s.accuracy_drop,
            "allowed_drop": s.thresholds.get("allowed_drop"),
            "images": s.images,
            "fallback": s.fallback,
        }
        for s in ledger.stages
        if s.name in job.gating
    }
    if pc.precision == "int8" and int8.details:
        details["int8"] = dict(int8.details)
        if StageName.ONNXRUNTIME_INT8 in fallback:
            details["int8"]["nodes_excluded"] = fallback[StageName.ONNXRUNTIME_INT8]
        if int8_speed is not None:
            details["int8"]["speed"] = int8_speed
    return details
