"""Evaluate a checkpoint on an ImageFolder split with its own recorded preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.data import Preprocess, image_folder
from train.engine import evaluate


def per_class_accuracy(
    preds: torch.Tensor, targets: torch.Tensor, classes: list[str]
) -> dict[str, float]:
    """Top-1 accuracy per class (NaN-free: classes without samples are left out)."""
    out = {}
    for i, name in enumerate(classes):
        mask = targets == i
        if mask.any():
            out[name] = (preds[mask] == i).float().mean().item()
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "val",
    *,
    batch_size: int = 32,
    workers: int = 2,
    verbose: bool = True,
) -> dict[str, Any]:
    """Per-class and overall top-1 of a checkpoint; prints a report ending 'top-1: NN.NN%'."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    ds = image_folder(Path(data), split, pre.eval_transform())
    if ds.classes != ckpt["classes"]:
        raise ValueError(
            f"{data}/{split} classes {ds.classes} differ from the checkpoint's {ckpt['classes']}"
        )
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    res, preds, targets = evaluate(model, loader, desc=f"evaluate {split}")
    per_class = per_class_accuracy(preds, targets, ds.classes)
    if verbose:
        for name, acc in per_class.items():
            n = int((targets == ds.classes.index(name)).sum())
            print(f"{name:>20s}: {100 * acc:6.2f}%  ({n} images)")
        print(f"top-1: {100 * res.acc:.2f}%")
    return {"top1": res.acc, "loss": res.loss, "images": res.samples, "per_class": per_class}
