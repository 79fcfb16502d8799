"""Reduced precision as release steps: the INT8 model, the accuracy-gated FP16/INT8
stages, which of them gate publishing, and what the card records.

Which reduced stage gates depends on what is published:

* ``TARGET=cpu PRECISION=fp32``: none (FP16/INT8 stages are reported, advisory);
* ``TARGET=cpu PRECISION=int8``: ``onnxruntime-int8`` (the served ``model.onnx`` is the
  INT8 graph); ``PRECISION=fp16``: ``onnxruntime-fp16`` (the FP16 graph, FP32 I/O);
* ``TARGET=gpu``: the FP16 stages (TensorRT FP16 engine), or ``tensorrt-int8`` with
  ``PRECISION=int8``.

Every reduced stage is judged by :class:`export.parity.AccuracyGate` against
``pytorch-fp32`` over every image; a gating one that fails goes to the precision
fallback (:mod:`export.precision_fallback`) when enabled.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.int8 import metadata_of, preprocess_for_quantization, quantize_int8
from export.run_state import INT8_STAGE, gating_stages
from export.stage_outputs import load_pixels, onnxruntime_logits
from serve.core.errors import UsageError

if TYPE_CHECKING:
    from export.run_state import ExportRun

log = logging.getLogger(__name__)

INT8_TRT_STAGE = "onnxruntime-int8-tensorrt"  # model_int8_trt.onnx, the TensorRT flavour


def served_stage(precision: str) -> str:
    """The stage whose model is the served ``model.onnx`` on CPU."""
    return {"fp32": "onnxruntime-fp32", "fp16": "onnxruntime-fp16", "int8": INT8_STAGE}[precision]


def export_int8(run: ExportRun) -> None:
    """Calibrate on training images (eval transform) and write ``model_int8.onnx``."""
    pc = run.cfg.precision
    if not pc.int8:
        return
    cal = pc.calibration
    data = pc.calibration_data or run.ckpt.config.get("data", "") or run.data
    if Path(str(data)).suffix == ".npz" and Path(str(data)).resolve() == Path(run.data).resolve():
        why = (
            f"INT8 calibration would use {data}, the file the gate judges: pass "
            "--calibration-data with the training images"
        )
        if pc.precision == "int8":
            raise UsageError(why)
        run.int8_skipped = why  # INT8 is only reported here: the FP32 export goes on
        log.warning("INT8 stage skipped: %s", why)
        return
    pixels = load_pixels(run.ckpt, data, cal.split, cal.batch_size, run.cfg.workers, cal.count)
    prepared = preprocess_for_quantization(run.onnx_path, run.out_dir / "model_prepared.onnx")
    cache = run.out_dir / "int8_calibration.json"
    cache.unlink(missing_ok=True)  # ranges of this model and these images only
    details = quantize_int8(
        prepared, run.int8_path, cal, pixels, cache, metadata=metadata_of(run.onnx_path)
    )
    # The TensorRT flavour (symmetric, float biases) from the same calibration ranges.
    trt = quantize_int8(
        prepared,
        run.int8_trt_path,
        cal,
        None,
        cache,
        metadata=metadata_of(run.onnx_path),
        tensorrt=True,
    )
    run.int8_details = {
        **details,
        "tensorrt_flavour": {
            "file": run.int8_trt_path.name,
            **{k: trt[k] for k in ("activation_type", "symmetric", "bias", "quantized_nodes")},
        },
        "calibration_data": Path(str(data)).name,
        "calibration_split": cal.split,
        "calibration_images": pixels.count,
        "calibration_batch_size": cal.batch_size,
    }


def check_int8(run: ExportRun) -> None:
    """``onnxruntime-int8`` vs ``pytorch-fp32``, accuracy-gated (gating for INT8 on CPU)."""
    assert run.pixels is not None and run.reference is not None
    if not run.cfg.precision.int8:
        run.skip(INT8_STAGE, "pytorch-fp32", "disabled (--no-int8-stage)")
        run.skip(INT8_TRT_STAGE, "pytorch-fp32", "disabled (--no-int8-stage)")
        return
    if run.int8_skipped:
        run.skip(INT8_STAGE, "pytorch-fp32", run.int8_skipped)
        run.skip(INT8_TRT_STAGE, "pytorch-fp32", run.int8_skipped)
        return
    run.int8_logits = onnxruntime_logits(run.int8_path, run.pixels)
    run.compare_reduced(INT8_STAGE, run.int8_logits)
    # The TensorRT flavour's accuracy, measured here with ONNX Runtime (advisory; on GPU
    # the tensorrt-int8 stage judges its engine).
    run.compare_reduced(INT8_TRT_STAGE, onnxruntime_logits(run.int8_trt_path, run.pixels))


def precision_details(run: ExportRun) -> dict[str, Any]:
    """What the card records about the published precision: the gate, its numbers, the
    calibration (INT8) and the fallback's choice."""
    pc = run.cfg.precision
    details: dict[str, Any] = {
        "precision": pc.precision,
        "gate": dataclasses.asdict(pc.gate),
    }
    if pc.precision == "fp32":
        return details
    names = gating_stages(pc.precision, run.cfg.serving.target)
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
        for s in run.stages
        if s.name in names
    }
    if pc.precision == "int8" and run.int8_details:
        details["int8"] = run.int8_details
    return details
