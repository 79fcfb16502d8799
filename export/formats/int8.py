"""INT8 ONNX by ONNX Runtime static quantization (QDQ, per-channel weights).

The FP32 graph (0..255 pixels in, normalization inside) goes through ORT's quantization
pre-processing (``quant_pre_process``: symbolic shape inference + graph optimization),
then ``quantize_static`` in QDQ format with per-channel weights, calibrated on *training*
images through the checkpoint's eval transform (never the val images the gate judges).

Parameters follow ORT's guidance for CPUs: QUInt8 activations and QInt8 weights, and
``reduce_range`` (7-bit weights) where the CPU lacks VNNI, against integer saturation.

``tensorrt=True`` writes the TensorRT flavour beside it (``model_int8_trt.onnx``, same
calibration ranges): explicit Q/DQ as TensorRT's parser accepts it - symmetric INT8
activations and weights (zero points 0, ``ActivationSymmetric``/``WeightSymmetric``)
and biases left in float (``QuantizeBias=False``; the CPU flavour's INT32 bias
``DequantizeLinear`` is refused by TensorRT). ONNX Runtime runs it too, but about half
as fast on a CPU without VNNI (float biases keep ORT from fusing to QLinearConv), so the
CPU serves its own flavour (docs/gpu-and-tensorrt.md "TensorRT builds" has the comparison,
ModelOpt too).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import onnx

from serve.backend.errors import UsageError
from serve.core.files import atomic_write_bytes

if TYPE_CHECKING:  # the pixels type only: importing it would import torch
    from export.checks.stages import PixelBatches

log = logging.getLogger(__name__)

CalibrationMethod = Literal["MinMax", "Percentile", "Entropy"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
# quantize_static extra_options for Q/DQ that TensorRT parses (and ORT CPU runs)
TENSORRT_QDQ = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}


@dataclass(frozen=True)
class Calibration:
    """How the INT8 model is calibrated: ``count`` images of ``split`` (eval transform),
    ORT's ``method``, per-channel or per-tensor weights, and ``reduce_range`` (None: on
    exactly when the CPU lacks VNNI). ``python -m export calibrate`` compares choices on
    training images only."""

    count: int = 128
    method: CalibrationMethod = "MinMax"
    split: str = "train"
    batch_size: int = 16
    reduce_range: bool | None = None
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"calibration method must be one of {CALIBRATION_METHODS}")
        if self.count < 1:
            raise UsageError(f"calibration count must be >= 1, got {self.count}")

    def resolved_reduce_range(self) -> bool:
        return (not cpu_has_vnni()) if self.reduce_range is None else self.reduce_range


def cpu_has_vnni() -> bool:
    """Whether this CPU has an 8-bit dot-product instruction (AVX512-VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class _PixelReader:
    """ORT's CalibrationDataReader over eval-transformed pixel batches (``single``: one
    image at a time - ORT's histogram collectors (Percentile, Entropy) fail on a last
    batch of another size: "inhomogeneous shape")."""

    def __init__(self, input_name: str, pixels: PixelBatches, single: bool = False) -> None:
        self.input_name = input_name
        self.batches = (
            [b[i : i + 1] for b in pixels.batches for i in range(len(b))]
            if single
            else pixels.batches
        )
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def preprocess_for_quantization(src: str | Path, dst: str | Path) -> Path:
    """ORT's quantization pre-processing (shape inference + optimization) into ``dst``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst))
    return Path(dst)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes whose INT8 version matters most (Conv, Gemm, MatMul), in order."""
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name]


def quantize_int8(
    prepared: str | Path,
    dst: str | Path,
    calibration: Calibration,
    pixels: PixelBatches | None,
    cache: str | Path,
    nodes_to_exclude: Sequence[str] = (),
    metadata: dict[str, str] | None = None,
    tensorrt: bool = False,
) -> dict[str, Any]:
    """Quantize the pre-processed FP32 graph to INT8 QDQ and write it atomically
    (``tensorrt``: the symmetric, float-bias flavour TensorRT parses).

    ``pixels`` (calibration images) may be None when ``cache`` already holds the ranges.
    Returns what was done (for the report and the card).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src = onnx.load(str(prepared))
    single = calibration.method != "MinMax"
    reader = _PixelReader(src.graph.input[0].name, pixels, single) if pixels is not None else None
    reduce_range = calibration.resolved_reduce_range()
    with tempfile.TemporaryDirectory(prefix="int8.") as tmp:
        out = Path(tmp) / "model_int8.onnx"
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=calibration.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude) or None,
            calibrate_method=getattr(CalibrationMethod, calibration.method),
            calibration_cache_path=str(cache),
            extra_options=dict(TENSORRT_QDQ) if tensorrt else {},
        )
        model = onnx.load(str(out))
    del model.metadata_props[:]
    for key, value in {**(metadata or {}), "precision": "int8"}.items():
        model.metadata_props.add(key=key, value=value)
    if nodes_to_exclude:
        model.metadata_props.add(key="fp32_nodes", value=",".join(nodes_to_exclude))
    onnx.checker.check_model(model)
    atomic_write_bytes(Path(dst), model.SerializeToString())
    details = {
        "format": "QDQ",
        "per_channel": calibration.per_channel,
        "flavour": "tensorrt" if tensorrt else "cpu",
        "activation_type": "QInt8" if tensorrt else "QUInt8",
        "weight_type": "QInt8",
        "symmetric": tensorrt,
        "bias": "float" if tensorrt else "int32",
        "reduce_range": reduce_range,
        "cpu_vnni": cpu_has_vnni(),
        "calibration_method": calibration.method,
        "nodes_excluded": list(nodes_to_exclude),
        "quantized_nodes": sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear"),
    }
    log.info("wrote %s (%s)", dst, details)
    return details


def metadata_of(path: str | Path) -> dict[str, str]:
    """The FP32 graph's metadata (the card travels in it) to carry into the INT8 graph."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key != "precision"}
