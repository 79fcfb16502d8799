"""The runner interface every runtime implements (Polygraphy's runners, for logits)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from export.checks.stages import PixelBatches, StageName


class Runner(Protocol):
    """A runtime loaded with one model: pixels in, logits out.

    ``stage`` is the parity stage it runs; ``logits`` takes every batch of ``pixels``
    (float32 0..255, NCHW; the Triton image stage reads ``pixels.images``) and returns
    float32 logits, one row per image, in order. A runner loads its model once, on first
    use, and may be called again (the batch sweep times repeated calls)."""

    stage: StageName

    def logits(self, pixels: PixelBatches) -> np.ndarray: ...
