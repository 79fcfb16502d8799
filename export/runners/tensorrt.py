"""A TensorRT plan (GPU hosts): the tensorrt-fp16 / tensorrt-int8 stages and ``replay
--engine``, through Polygraphy's TrtRunner (export/formats/tensorrt_engine.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.checks.stages import PixelBatches, StageName
from export.formats.tensorrt_engine import tensorrt_logits
from serve.core.names import INPUT_NAME, OUTPUT_NAME


@dataclass
class TensorRTRunner:
    """``plan`` on this host's GPU, batches split to fit the plan's profile (the plan's
    metadata is checked against this TensorRT and GPU first)."""

    plan: str | Path
    stage: StageName = StageName.TENSORRT_FP16

    def logits(self, pixels: PixelBatches) -> np.ndarray:
        return tensorrt_logits(self.plan, pixels.batches, INPUT_NAME, OUTPUT_NAME)
