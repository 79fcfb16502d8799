"""Model warmup from real val images: the input files Triton sends while a model loads.

Triton's ``model_warmup`` (model_config.proto ``ModelWarmup``) runs sample requests on
every model instance before the model is reported ready, so lazy initialization (ONNX
Runtime's first run, memory arenas, TensorRT contexts, Pillow's decoders) is paid at
load time instead of by the first client. Each entry names an ``input_data_file`` that
Triton reads from ``<model>/warmup/`` (the model's folder, beside ``config.pbtxt``; the
version folders hold the model files) and sends ``batch_size`` times as one batch.

File format (model_config.proto, ``ModelWarmup.Input.input_data_file``): the raw bytes
of one item in row-major order; for a BYTES (``TYPE_STRING``) input every element is a
4-byte little-endian length followed by its bytes. So:

* the classifier (``input``: FP32 [3, H, W]): one val image decoded and resized exactly
  as the preprocess model does (serve/backend/preprocess.py), 0..255 RGB, float32 little-endian;
* the preprocess model (``IMAGE``: BYTES [1]): the same image's encoded file, length-
  prefixed, so its decoder runs on a real JPEG/PNG.

One image per warmup batch size (batch 1 and each preferred batch size), different
images where the split has enough.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.triton.config import WarmupSample
from serve.backend.errors import UsageError
from serve.backend.preprocess import ResizeCrop, preprocess
from serve.core.card import ModelCard
from serve.core.files import atomic_write_bytes
from serve.core.names import IMAGE_INPUT, INPUT_NAME

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"  # Triton's fixed folder name, inside the model's folder


def bytes_element(data: bytes) -> bytes:
    """One BYTES element as Triton's warmup file holds it: uint32 LE length + bytes."""
    return struct.pack("<I", len(data)) + data


def fp32_item(pixels: np.ndarray) -> bytes:
    """One FP32 tensor item, row-major, little-endian."""
    return np.ascontiguousarray(pixels, dtype="<f4").tobytes()


@dataclass
class ModelWarmup:
    """Warmup files of one model (file name -> content) and the config entries using them."""

    files: dict[str, bytes] = field(default_factory=dict)
    samples: list[WarmupSample] = field(default_factory=list)

    def write(self, model_dir: str | Path) -> list[Path]:
        """Write the files (atomically each) into ``<model_dir>/warmup/``."""
        folder = Path(model_dir) / WARMUP_DIR
        if self.files:
            folder.mkdir(parents=True, exist_ok=True)
        return [atomic_write_bytes(folder / name, data) for name, data in self.files.items()]


@dataclass
class PipelineWarmup:
    """Warmup of the classifier (pixels) and of the image pipeline's preprocess model."""

    classifier: ModelWarmup
    preprocess: ModelWarmup


def build_warmup(images: list[bytes], card: ModelCard, batch_sizes: list[int]) -> PipelineWarmup:
    """Warmup data from encoded val ``images``: one image per batch size (cycling when
    there are fewer images), as pixels for the classifier and as bytes for preprocess."""
    clf, pre = ModelWarmup(), ModelWarmup()
    if not batch_sizes:
        return PipelineWarmup(clf, pre)
    if not images:
        raise UsageError("warmup needs at least one encoded val image")
    p = card.preprocessing
    geometry = ResizeCrop(p.resize, p.crop, p.interpolation)
    for i, batch in enumerate(batch_sizes):
        image = images[i % len(images)]
        pixels = preprocess(image, geometry)
        if list(pixels.shape) != list(card.input.shape):
            raise ValueError(f"warmup pixels {pixels.shape} != card input {card.input.shape}")
        clf_file = f"{INPUT_NAME}_batch{batch}.fp32"
        pre_file = f"{IMAGE_INPUT}_batch{batch}.bytes"
        clf.files[clf_file] = fp32_item(pixels)
        pre.files[pre_file] = bytes_element(image)
        clf.samples.append(WarmupSample(batch, clf_file))
        pre.samples.append(WarmupSample(batch, pre_file))
    return PipelineWarmup(clf, pre)


def val_images(ckpt, data: str | Path, split: str, count: int) -> list[bytes]:
    """``count`` encoded images of the split (a fixed random subset, the parity stages'
    sampling): the files' own bytes for image folders, PNG for array datasets."""
    from export.checks.stage_outputs import encoded_images

    if count <= 0:
        return []
    return encoded_images(ckpt, data, split, limit=count)[:count]
