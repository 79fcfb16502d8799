"""What one export run is given: :class:`ExportConfig` with its :class:`PrecisionConfig`,
and which reduced-precision stages gate publishing (:func:`gating_stages`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from export.checks.parity import (
    FP16_GATE,
    FP32_GATE,
    AccuracyGate,
)
from export.checks.stages import StageName
from export.formats.int8 import Calibration
from export.formats.tensorrt_engine import EngineProfile
from export.formats.tensorrt_rtx import DEFAULT_RTX_TARGETS, parse_targets
from export.triton.config import ServingConfig
from serve.backend.errors import UsageError

Precision = Literal["fp32", "fp16", "int8"]
# the reduced-precision stages that decide nothing (not published): on a stratified
# sample of the val images, on every one, or not at all
Advisory = Literal["sample", "all", "off"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def gating_stages(precision: str, target: str) -> set[StageName]:
    """The reduced-precision stages that gate publishing for this precision and target."""
    if target == "gpu":
        if precision == "int8":
            return {StageName.TENSORRT_INT8}
        return {StageName.ONNXRUNTIME_FP16, StageName.PYTORCH_FP16, StageName.TENSORRT_FP16}
    served = {"int8": StageName.ONNXRUNTIME_INT8, "fp16": StageName.ONNXRUNTIME_FP16}
    return {served[precision]} if precision in served else set()


@dataclass
class PrecisionConfig:
    """What precision to publish, how reduced stages are judged, how INT8 is calibrated,
    and the fallback search's budget (``fallback_rounds`` re-checks at most)."""

    precision: Precision = "fp32"
    gate: AccuracyGate = field(default_factory=AccuracyGate)
    calibration: Calibration = field(default_factory=Calibration)
    calibration_data: str = ""  # default: the checkpoint's training data
    int8: bool = True
    fallback: bool = True
    fallback_rounds: int = 8
    fallback_groups: int = 8
    fallback_max_fraction: float = 0.75
    # PRECISION=int8 (CPU) must pay off: INT8 images/s >= this x FP32's, measured here
    min_int8_speedup: float = 1.15

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "int8" and not self.int8:
            raise UsageError("PRECISION=int8 needs the INT8 stage (drop --no-int8-stage)")
        if not 0 < self.gate.min_agreement <= 1 or self.gate.max_accuracy_drop < 0:
            raise UsageError(f"invalid accuracy gate {self.gate}")
        if self.min_int8_speedup < 0:
            raise UsageError(f"--min-int8-speedup must be >= 0, got {self.min_int8_speedup}")


@dataclass
class ExportConfig:
    """Inputs of one export run."""

    checkpoint: str
    name: str = ""
    data: str = ""
    split: str = "val"
    repository: str = "model_repository"
    out_dir: str = ""
    publish: bool = True
    force: bool = False
    batch_size: int = 32
    workers: int = 2
    atol: float = FP32_GATE.atol
    parity_limit: int = 0
    fp16: bool = True
    advisory: Advisory = "sample"
    advisory_sample: int = 32
    keep_fp16_edges: bool = False
    fp16_tolerance: float = FP16_GATE.atol
    triton_parity: bool = True
    deploy: str = ""  # HOST:PORT of a live server to load the new version into
    admin_key_file: str = ""
    engine: str = ""
    timing_cache: str = ""
    onnx_cache: str = ""  # "" -> $TRAINSERVE_ONNX_CACHE or ~/.cache/trainserve/onnx; "off"
    profile: EngineProfile = field(default_factory=EngineProfile)
    # compute capabilities every ONNX is built for with TensorRT-RTX (() : no builds)
    trt_rtx_targets: tuple[str, ...] = DEFAULT_RTX_TARGETS
    serving: ServingConfig = field(default_factory=ServingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def validate(self) -> None:
        self.precision.validate()
        self.trt_rtx_targets = parse_targets(self.trt_rtx_targets)
        if self.precision.precision == "fp16" and not self.fp16:
            raise UsageError("PRECISION=fp16 needs the FP16 stages (drop --no-fp16-stages)")
        if not 0 < self.atol <= FP32_GATE.atol:
            raise UsageError(
                f"atol {self.atol:g} must be in (0, {FP32_GATE.atol:g}]: the gate can "
                "be tightened, not loosened (use --force to publish anyway)"
            )
        if self.advisory_sample < 1:
            raise UsageError(f"--advisory-sample must be >= 1, got {self.advisory_sample}")
        if self.fp16_tolerance <= 0:
            raise UsageError(f"fp16 tolerance must be > 0, got {self.fp16_tolerance:g}")
