"""What one export run is given and what its steps share: :class:`ExportConfig` (with
its :class:`PrecisionConfig`), the run's inputs, and :class:`ExportRun`, the state each
step of :func:`export.release.run_export` reads and extends. Kept apart from the steps
(export/release.py, export/precision.py, export/precision_fallback.py) so that they
import it and not each other."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from export.int8 import Calibration
from export.parity import (
    FP16_GATE,
    FP32_GATE,
    AccuracyGate,
    Stage,
    Thresholds,
    format_stage,
    judge,
    skipped,
)
from export.publish import Published
from export.stage_outputs import PixelBatches
from export.tensorrt_engine import DEFAULT_RTX_TARGETS, EngineProfile, RtxBuild, parse_targets
from export.triton_config import ServingConfig
from serve.core.contract import ModelCard
from serve.core.errors import UsageError
from serve.core.files import sha256
from train.checkpoint import Checkpoint

log = logging.getLogger("export.release")

PRECISIONS = ("fp32", "fp16", "int8")
INT8_STAGE = "onnxruntime-int8"


def gating_stages(precision: str, target: str) -> set[str]:
    """The reduced-precision stages that gate publishing for this precision and target."""
    if target == "gpu":
        if precision == "int8":
            return {"tensorrt-int8"}
        return {"onnxruntime-fp16", "pytorch-fp16", "tensorrt-fp16"}
    return {"int8": {INT8_STAGE}, "fp16": {"onnxruntime-fp16"}}.get(precision, set())


@dataclass
class PrecisionConfig:
    """What precision to publish, how reduced stages are judged, how INT8 is calibrated,
    and the fallback search's budget (``fallback_rounds`` re-checks at most)."""

    precision: str = "fp32"
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
    fp16_limit: int = 1000
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
        if self.fp16_tolerance <= 0:
            raise UsageError(f"fp16 tolerance must be > 0, got {self.fp16_tolerance:g}")


@dataclass
class ExportRun:
    """What the steps share."""

    cfg: ExportConfig
    ckpt: Checkpoint
    name: str
    data: str
    out_dir: Path
    stages: list[Stage] = field(default_factory=list)
    diffs: dict[str, np.ndarray] = field(default_factory=dict)
    pixels: PixelBatches | None = None
    reference: np.ndarray | None = None
    ort32: np.ndarray | None = None
    engine: Path | None = None
    card: ModelCard | None = None
    report: dict[str, Any] = field(default_factory=dict)
    published: Published | None = None
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    int8_logits: np.ndarray | None = None
    int8_details: dict[str, Any] = field(default_factory=dict)
    int8_skipped: str = ""  # why no INT8 model was built (an advisory stage left out)
    onnx_cached: str = ""  # the cache key when model.onnx reused an earlier export
    rtx_builds: list[RtxBuild] = field(default_factory=list)

    @cached_property
    def checkpoint_sha256(self) -> str:
        """The checkpoint file's sha256 (the ONNX cache key and the card's provenance)."""
        return sha256(self.cfg.checkpoint)

    @property
    def onnx_path(self) -> Path:
        return self.out_dir / "model.onnx"

    @property
    def fp16_path(self) -> Path:
        return self.out_dir / "model_fp16.onnx"

    @property
    def int8_path(self) -> Path:
        return self.out_dir / "model_int8.onnx"

    @property
    def int8_trt_path(self) -> Path:
        """The INT8 Q/DQ graph TensorRT parses (symmetric, float biases; export/int8.py)."""
        return self.out_dir / "model_int8_trt.onnx"

    @property
    def served_onnx(self) -> Path:
        """The ONNX published as the version's ``model.onnx``: on CPU the card's precision;
        for ``tensorrt_plan`` the graph the strongly typed plans are built from (FP16, or
        INT8 Q/DQ with ``PRECISION=int8``), so ``python -m export trt`` rebuilds the same."""
        precision = self.cfg.precision.precision
        if self.cfg.serving.kind == "gpu-tensorrt":
            return self.int8_trt_path if precision == "int8" else self.fp16_path
        if self.cfg.serving.target != "cpu" or precision == "fp32":
            return self.onnx_path
        return self.int8_path if precision == "int8" else self.fp16_path

    @property
    def fp32_gate(self) -> Thresholds:
        return Thresholds(min_top1=FP32_GATE.min_top1, stat="max", atol=self.cfg.atol)

    @property
    def fp16_gate(self) -> Thresholds:
        tol = self.cfg.fp16_tolerance
        return Thresholds(min_top1=FP16_GATE.min_top1, stat="median", atol=tol, rtol=tol)

    @property
    def required_build_precision(self) -> str:
        """The precision whose TensorRT-RTX build gates publishing: what ``TARGET=gpu``
        serves (its engine is FP16, or INT8 with ``PRECISION=int8``); "" on CPU targets."""
        if self.cfg.serving.target != "gpu":
            return ""
        return "int8" if self.cfg.precision.precision == "int8" else "fp16"

    @property
    def failed_required_builds(self) -> list[RtxBuild]:
        return [
            b
            for b in self.rtx_builds
            if b.status == "failed" and b.precision == self.required_build_precision
        ]

    @property
    def passed(self) -> bool:
        """No gating stage failed (advisory stages are reported, not enforced) and, for
        ``TARGET=gpu``, the published precision built with TensorRT-RTX."""
        stages_ok = all(s.status != "failed" or not s.gating for s in self.stages)
        return stages_ok and not self.failed_required_builds

    def compare(
        self,
        name: str,
        reference: str,
        ref: np.ndarray,
        out: np.ndarray,
        gate: Thresholds,
        gating: bool = True,
    ) -> Stage:
        assert self.pixels is not None
        labels = self.pixels.labels[: len(out)]
        stage = judge(name, reference, ref, out, gate, gating, labels, self.ckpt.card.classes)
        self.stages.append(stage)
        self.diffs[name] = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
        self.logits[name] = np.asarray(out)
        log.info("%s", format_stage(stage))
        return stage

    def compare_reduced(self, name: str, out: np.ndarray) -> Stage:
        """A reduced-precision stage vs ``pytorch-fp32``, judged by the accuracy gate;
        gating when its model is what gets published (:func:`gating_stages`)."""
        assert self.reference is not None
        gating = name in gating_stages(self.cfg.precision.precision, self.cfg.serving.target)
        ref = self.reference[: len(out)]
        return self.compare(name, "pytorch-fp32", ref, out, self.cfg.precision.gate, gating)

    def skip(self, name: str, reference: str, reason: str) -> None:
        self.stages.append(skipped(name, reference, reason))
        log.info("%s", format_stage(self.stages[-1]))
