"""The real images every parity stage runs on: the val split through the checkpoint's own
eval transform as pixel batches, and the same images encoded (export/runners run them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from export.checks.stages import PixelBatches
from serve.backend.errors import UsageError
from train.data.datasets import dataset_split, subset
from train.data.preprocess import Preprocess
from train.models.checkpoint import Checkpoint
from train.run.progress import progress


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
