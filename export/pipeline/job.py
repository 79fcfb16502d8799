"""One export run's fixed inputs: the config, the checkpoint, the model name, the data and
the run folder, with the file names and gates every step derives from them. Steps take an
:class:`ExportJob` and never change it; what they produce they return
(export/pipeline/release.py names each product)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from export.checks.parity import FP16_GATE, FP32_GATE, Thresholds
from export.checks.stages import TRITON_STAGES, StageName
from export.formats.tensorrt_rtx import RtxBuild
from export.pipeline.config import ExportConfig, gating_stages
from serve.core.files import sha256
from train.models.checkpoint import Checkpoint


@dataclass(frozen=True)
class ExportJob:
    """What every step of the export reads: the inputs, resolved once by
    :func:`export.pipeline.build.start`."""

    cfg: ExportConfig
    ckpt: Checkpoint
    name: str
    data: str
    out_dir: Path

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
        """The INT8 Q/DQ graph TensorRT parses (symmetric, float biases; export/formats/int8.py)."""
        return self.out_dir / "model_int8_trt.onnx"

    @property
    def precision(self) -> str:
        """The precision to publish: fp32, fp16 or int8."""
        return self.cfg.precision.precision

    @property
    def served_onnx(self) -> Path:
        """The ONNX published as the version's ``model.onnx``: on CPU the card's precision;
        for ``tensorrt_plan`` the graph the strongly typed plans are built from (FP16, or
        INT8 Q/DQ with ``PRECISION=int8``), so ``python -m export trt`` rebuilds the same."""
        if self.cfg.serving.kind == "gpu-tensorrt":
            return self.int8_trt_path if self.precision == "int8" else self.fp16_path
        if self.cfg.serving.target != "cpu" or self.precision == "fp32":
            return self.onnx_path
        return self.int8_path if self.precision == "int8" else self.fp16_path

    def stage_models(self, engine: Path | None = None) -> dict[str, Path]:
        """The model file each parity stage runs (what the bundle carries to replay it)."""
        models: dict[str, Path] = {
            StageName.ONNXRUNTIME_FP32: self.onnx_path,
            StageName.ONNXRUNTIME_FP16: self.fp16_path,
            StageName.ONNXRUNTIME_INT8: self.int8_path,
            StageName.ONNXRUNTIME_INT8_TENSORRT: self.int8_trt_path,
            **{stage: self.served_onnx for stage in TRITON_STAGES},
        }
        if engine is not None:
            models.update({StageName.TENSORRT_FP16: engine, StageName.TENSORRT_INT8: engine})
        return models

    @property
    def gating(self) -> set[StageName]:
        """The reduced-precision stages that gate publishing here (:func:`gating_stages`)."""
        return gating_stages(self.precision, self.cfg.serving.target)

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
        return "int8" if self.precision == "int8" else "fp16"

    def failed_required_builds(self, builds: list[RtxBuild]) -> list[RtxBuild]:
        """The TensorRT-RTX builds of what ``TARGET=gpu`` serves that failed."""
        return [
            b
            for b in builds
            if b.status == "failed" and b.precision == self.required_build_precision
        ]
