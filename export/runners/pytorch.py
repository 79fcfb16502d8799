"""The checkpoint in PyTorch: the reference stage (FP32) and PyTorch FP16 (``.half()``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.checks.stages import PixelBatches, StageName
from train.models.checkpoint import Checkpoint, model_from_checkpoint
from train.run.progress import progress


@dataclass
class PyTorchRunner:
    """The trained model as trained: ``(x / 255 - mean) / std`` then the network, in FP32
    (``PYTORCH_FP32``, channels-last: oneDNN's fast path on CPU) or FP16 (``PYTORCH_FP16``:
    inputs normalized in FP32 then cast; the faster memory layout, timed on the first
    batch - CPU FP16 kernels differ a lot by layout). ``threads`` sets torch's threads
    (0: leave them)."""

    ckpt: Checkpoint
    stage: StageName = StageName.PYTORCH_FP32
    threads: int = 0
    _model: Any = field(default=None, init=False, repr=False)
    _channels_last: bool | None = field(default=None, init=False, repr=False)

    def _load(self) -> Any:
        import torch

        if self._model is None:
            if self.threads:
                torch.set_num_threads(self.threads)
            model = model_from_checkpoint(self.ckpt).eval()
            if self.stage == StageName.PYTORCH_FP16:
                model = model.half()
            else:
                model = model.to(memory_format=torch.channels_last)
                self._channels_last = True
            self._model = model
        return self._model

    def _fastest_layout(self, x: Any) -> bool:
        """Time one batch in both layouts; True when channels_last is faster."""
        import torch

        times = []
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self._model.to(memory_format=fmt)
            t = time.perf_counter()
            self._model(x.contiguous(memory_format=fmt))
            times.append(time.perf_counter() - t)
        return times[1] < times[0]

    def logits(self, pixels: PixelBatches) -> np.ndarray:
        import torch

        model = self._load()
        dtype = torch.float16 if self.stage == StageName.PYTORCH_FP16 else torch.float32
        pre = self.ckpt.card.preprocessing
        mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        std = torch.tensor(pre.std).view(1, 3, 1, 1)
        batches = pixels.batches
        if len(batches) > 1:
            batches = progress(batches, desc=str(self.stage))
        outs = []
        with torch.no_grad():
            for x in batches:
                batch = ((torch.from_numpy(x) / 255 - mean) / std).to(dtype)
                if self._channels_last is None:
                    self._channels_last = self._fastest_layout(batch[:2])
                    fmt = torch.channels_last if self._channels_last else torch.contiguous_format
                    model.to(memory_format=fmt)
                if self._channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                outs.append(model(batch).float().numpy())
        return np.concatenate(outs)
