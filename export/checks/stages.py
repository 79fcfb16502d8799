"""The parity stages by name, and the images every stage runs on (torch-free).

Every place that runs, judges, records or replays a stage names it with
:class:`StageName` (a ``str``, so parity.json, the bundle and the ledger keep the plain
names they always had); every runner (export/runners) takes :class:`PixelBatches`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np


@dataclass
class PixelBatches:
    """Eval-transformed images as float32 0..255 NCHW pixel batches, with labels and
    paths; ``images``, when known, the same images encoded (what a raw-image client
    sends: the Triton image stage runs on these)."""

    batches: list[np.ndarray]
    labels: np.ndarray
    paths: list[str]
    images: Sequence[bytes] | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.batches)

    @classmethod
    def of(
        cls, pixels: np.ndarray, batch: int = 32, images: Sequence[bytes] | None = None
    ) -> PixelBatches:
        """One array of pixels as batches of ``batch`` (labels and paths unknown)."""
        batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
        return cls(batches, np.zeros(0, np.int64), [], images)

    def take(self, indices: np.ndarray, batch: int = 0) -> PixelBatches:
        """The images at ``indices`` (pixels, labels, paths, encoded images), in batches
        of ``batch`` (0: the size of these batches)."""
        batch = batch or max(len(b) for b in self.batches)
        taken = PixelBatches.of(np.concatenate(self.batches)[indices], batch)
        taken.labels = self.labels[indices]
        taken.paths = [self.paths[i] for i in indices]
        taken.images = None if self.images is None else [self.images[i] for i in indices]
        return taken


class StageName(str, Enum):
    """One parity stage: a runtime running one model file at one precision."""

    PYTORCH_FP32 = "pytorch-fp32"  # the reference every stage is judged against
    PYTORCH_FP16 = "pytorch-fp16"
    ONNXRUNTIME_FP32 = "onnxruntime-fp32"
    ONNXRUNTIME_FP16 = "onnxruntime-fp16"
    ONNXRUNTIME_INT8 = "onnxruntime-int8"
    ONNXRUNTIME_INT8_TENSORRT = "onnxruntime-int8-tensorrt"  # model_int8_trt.onnx
    TENSORRT_FP16 = "tensorrt-fp16"
    TENSORRT_INT8 = "tensorrt-int8"
    TRITON_HTTP = "triton-http"  # the published version through the served stack
    TRITON_GRPC = "triton-grpc"
    TRITON_IMAGE = "triton-image"  # encoded images through the preprocess ensemble

    def __str__(self) -> str:
        return self.value

    @property
    def runtime(self) -> str:
        """What runs it: pytorch, onnxruntime, tensorrt, or triton-http/-grpc/-image."""
        return self.value if self.is_triton else self.value.split("-", 1)[0]

    @property
    def is_triton(self) -> bool:
        """Served by Triton (judged against the stage of the precision it serves)."""
        return self.value.startswith("triton-")

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8; a Triton stage serves whichever precision was published."""
        return "" if self.is_triton else self.value.split("-")[1]


REFERENCE = StageName.PYTORCH_FP32
TRITON_STAGES = (StageName.TRITON_HTTP, StageName.TRITON_GRPC, StageName.TRITON_IMAGE)
