"""What the sync and async classifiers share (tritonclient; no torch): images encoded as
the model's input (pixels preprocessed here, or encoded bytes as they are), its
inputs/outputs and batches of at most the model's max batch. The clients themselves are
serve/client/client.py (:class:`~serve.client.client.Classifier`) and
serve/client/async_classifier.py (:class:`~serve.client.async_classifier.AsyncClassifier`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serve.backend.preprocess import ImageError, ImageSource, Limits, preprocess
from serve.client.model_info import ModelInfo


def read_bytes(source: ImageSource) -> bytes:
    """Encoded image bytes from a path (or bytes as they are)."""
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return path.read_bytes()


class ClassifierBase:
    """What the sync and async clients share: inputs, outputs, batching."""

    protocol: str
    module: Any
    info: ModelInfo
    max_batch: int
    limits: Limits
    version: str

    def encode(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Images -> the model's input array: pixels [N, 3, H, W] or bytes [N, 1]."""
        if self.info.raw:
            return np.array([[read_bytes(im)] for im in images], dtype=object)
        assert self.info.geometry is not None
        return np.stack([preprocess(im, self.info.geometry, limits=self.limits) for im in images])

    def _inputs(self, batch: np.ndarray) -> Any:
        dtype = "BYTES" if batch.dtype == object else self.info.input_dtype
        return self.module.InferInput(self.info.input_name, list(batch.shape), dtype)

    def _outputs(self, class_count: int) -> list:
        return [self.module.InferRequestedOutput(self.info.output_name, class_count=class_count)]

    def _chunks(self, array: np.ndarray) -> list[np.ndarray]:
        return [array[i : i + self.max_batch] for i in range(0, len(array), self.max_batch)]


def server_image_error(e: BaseException) -> ImageError | None:
    """An image the server could not decode ("bad image: ..." from the preprocess model,
    through the ensemble) as the ImageError a local decode raises: the server's reason,
    none of the ensemble's wrapping. None for any other error."""
    text = str(e)
    at = text.lower().find("bad image: ")
    return None if at < 0 else ImageError(text[at + len("bad image: ") :])
