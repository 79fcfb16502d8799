"""Logits of each pipeline stage on the same real images (the inputs of every parity check)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from train.checkpoint import model_from_checkpoint
from train.data import Preprocess, image_folder
from train.progress import progress


@dataclass
class PixelBatches:
    """Eval-transformed images as float32 0..255 NCHW pixel batches, with labels and paths."""

    batches: list[np.ndarray]
    labels: np.ndarray
    paths: list[str]

    @property
    def count(self) -> int:
        return len(self.paths)


def load_pixels(
    ckpt: dict[str, Any],
    data: str | Path,
    split: str = "val",
    batch_size: int = 32,
    workers: int = 2,
) -> PixelBatches:
    """Every image of ``data/split`` through the checkpoint's own eval Resize + CenterCrop."""
    pre = Preprocess.from_dict(ckpt["preprocess"])
    ds = image_folder(Path(data), split, pre.eval_transform(normalize=False))
    if ds.classes != list(ckpt["classes"]):
        raise ValueError(
            f"{data}/{split} classes {ds.classes} differ from the checkpoint's {ckpt['classes']}"
        )
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    batches, labels = [], []
    for x, y in progress(loader, desc=f"load {split} images"):
        batches.append(x.numpy())
        labels.append(y.numpy())
    return PixelBatches(batches, np.concatenate(labels), [p for p, _ in ds.samples])


@torch.no_grad()
def pytorch_logits(
    ckpt: dict[str, Any], pixels: PixelBatches, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """The trained model as trained: ``(x / 255 - mean) / std`` then the network."""
    model = model_from_checkpoint(ckpt).to(dtype)
    pre = ckpt["preprocess"]
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    outs = []
    for x in progress(pixels.batches, desc=f"pytorch {str(dtype).split('.')[-1]}"):
        normalized = (torch.from_numpy(x) / 255 - mean) / std
        outs.append(model(normalized.to(dtype)).float().numpy())
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
