"""Logits of each pipeline stage on the same real images (the inputs of every parity check)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from serve.backend.errors import UsageError
from train.data.datasets import dataset_split, subset
from train.data.preprocess import Preprocess
from train.models.checkpoint import Checkpoint, model_from_checkpoint
from train.run.progress import progress


@dataclass
class PixelBatches:
    """Eval-transformed images as float32 0..255 NCHW pixel batches, with labels and paths."""

    batches: list[np.ndarray]
    labels: np.ndarray
    paths: list[str]

    @property
    def count(self) -> int:
        return len(self.paths)


def _kind(ckpt: Checkpoint, data: str | Path) -> str:
    """The dataset kind the run used, when ``data`` is its data; else detect it."""
    config = ckpt.config
    return config.get("dataset", "auto") if str(data) == config.get("data") else "auto"


def load_pixels(
    ckpt: Checkpoint,
    data: str | Path,
    split: str = "val",
    batch_size: int = 32,
    workers: int = 2,
    limit: int = 0,
) -> PixelBatches:
    """Every image of the split (or a fixed random ``limit`` of them) through the
    checkpoint's own eval Resize + CenterCrop, as float32 0..255 pixels."""
    pre = Preprocess.from_card(ckpt.card.preprocessing)
    ds: Any = subset(  # an ImageFolder or an array dataset, maybe through a Subset
        dataset_split(data, split, pre.eval_transform(normalize=False), _kind(ckpt, data)),
        limit,
        seed=0,
    )
    if list(ds.classes) != ckpt.card.classes:
        raise UsageError(
            f"{data} ({split}) classes {list(ds.classes)} differ from the "
            f"checkpoint's {ckpt.card.classes}"
        )
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    batches, labels = [], []
    for x, y in progress(loader, desc=f"load {split} images"):
        batches.append(x.numpy())
        labels.append(y.numpy())
    return PixelBatches(batches, np.concatenate(labels), sample_names(ds))


def sample_names(ds: Any) -> list[str]:
    """File paths of an ImageFolder (also through a Subset), else ``<source>[i]``."""
    base, idx = (ds.dataset, list(ds.indices)) if hasattr(ds, "indices") else (ds, None)
    idx = idx if idx is not None else list(range(len(base)))
    if hasattr(base, "samples"):
        return [base.samples[i][0] for i in idx]
    return [f"{getattr(base, 'source', 'dataset')}[{i}]" for i in idx]


@torch.no_grad()
def pytorch_logits(
    ckpt: Checkpoint, pixels: PixelBatches, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """The trained model as trained: ``(x / 255 - mean) / std`` then the network, in the
    channels-last layout (oneDNN's fast path on CPU: 2x here, the same numbers within
    float rounding)."""
    model = model_from_checkpoint(ckpt).to(dtype).to(memory_format=torch.channels_last)
    pre = ckpt.card.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    outs = []
    for x in progress(pixels.batches, desc=f"pytorch {str(dtype).split('.')[-1]}"):
        normalized = (torch.from_numpy(x) / 255 - mean) / std
        batch = normalized.to(dtype).contiguous(memory_format=torch.channels_last)
        outs.append(model(batch).float().numpy())
    return np.concatenate(outs)


def onnxruntime_logits(onnx_path: str | Path, pixels: PixelBatches, threads: int = 0) -> np.ndarray:
    """ONNX Runtime (CPU) on the 0..255 pixels, batch by batch."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x})[0] for x in progress(pixels.batches, desc="onnxruntime")]
    )


def encoded_images(
    ckpt: Checkpoint, data: str | Path, split: str = "val", limit: int = 0
) -> list[bytes]:
    """The same images as :func:`load_pixels` (same order and subset), encoded: the files'
    own bytes for an ImageFolder, lossless PNG for arrays. What a raw-image client sends."""
    import io

    from PIL import Image

    ds: Any = subset(dataset_split(data, split, None, _kind(ckpt, data)), limit, seed=0)
    base, idx = (ds.dataset, list(ds.indices)) if hasattr(ds, "indices") else (ds, None)
    idx = idx if idx is not None else list(range(len(base)))
    if hasattr(base, "samples"):
        return [Path(base.samples[i][0]).read_bytes() for i in idx]
    out = []
    for i in idx:
        buf = io.BytesIO()
        Image.fromarray(base.x[i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
