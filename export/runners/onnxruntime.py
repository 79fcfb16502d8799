"""ONNX Runtime (CPU) on an ONNX file: the ONNX stages (FP32, FP16, INT8), torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.checks.stages import PixelBatches, StageName
from train.run.progress import progress


@dataclass
class OnnxRuntimeRunner:
    """``path`` in an ONNX Runtime CPU session (``threads`` intra-op threads, 0: ORT's
    default), batch by batch."""

    path: str | Path
    stage: StageName = StageName.ONNXRUNTIME_FP32
    threads: int = 0
    _session: Any = field(default=None, init=False, repr=False)

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            self._session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def logits(self, pixels: PixelBatches) -> np.ndarray:
        name = self.session.get_inputs()[0].name
        batches = pixels.batches
        if len(batches) > 1:  # a progress bar for a run over the images, not per timed call
            batches = progress(batches, desc=str(self.stage))
        return np.concatenate([self.session.run(None, {name: x})[0] for x in batches])
