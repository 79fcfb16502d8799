"""Evaluate a checkpoint or published weights on a dataset split, with the model's own
recorded preprocessing: per-class top-1, then ``top-1: NN.NN%``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from serve.backend.errors import UsageError
from serve.core.plots import plot_confusion
from train.data.datasets import classes_of, dataset_split, subset
from train.data.preprocess import Preprocess
from train.models.archs import build_model, get_arch
from train.models.checkpoint import load_checkpoint, model_from_checkpoint
from train.models.pretrained import known_weights, load_backbone, read_state_dict_file
from train.run.loop import validate


def per_class_accuracy(
    preds: torch.Tensor, targets: torch.Tensor, classes: list[str]
) -> dict[str, float]:
    """Top-1 accuracy per class (classes without samples are left out)."""
    out = {}
    for i, name in enumerate(classes):
        mask = targets == i
        if mask.any():
            out[name] = (preds[mask] == i).float().mean().item()
    return out


def evaluate_model(
    model: torch.nn.Module,
    pre: Preprocess,
    classes: list[str] | None,
    data: str | Path,
    split: str = "val",
    *,
    dataset: str = "auto",
    batch_size: int = 256,
    workers: int = 2,
    verbose: bool = True,
    confusion_png: str | None = None,
    limit: int = 0,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data``/``split`` through ``pre``'s eval transform
    (on a fixed random ``limit`` images when > 0: the same ones as ``--val-subset``)."""
    ds = subset(dataset_split(data, split, pre.eval_transform(), dataset), limit, seed=0)
    ds_classes = classes_of(ds)
    if classes is not None and ds_classes != list(classes):
        raise UsageError(
            f"{data} ({split}) classes {ds_classes} differ from the model's {list(classes)}"
        )
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    res, preds, targets = validate(model.eval(), loader, desc=f"evaluate {split}")
    per_class = per_class_accuracy(preds, targets, ds_classes)
    if verbose:
        for name, acc in per_class.items():
            n = int((targets == ds_classes.index(name)).sum())
            print(f"{name:>20s}: {100 * acc:6.2f}%  ({n} images)")
        print(f"top-1: {100 * res.acc:.2f}%")
    if confusion_png:
        from train.run.report import confusion_matrix

        plot_confusion(confusion_matrix(preds, targets, len(ds_classes)), ds_classes, confusion_png)
    return {"top1": res.acc, "loss": res.loss, "images": res.samples, "per_class": per_class}


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | Path | None = None, split: str = "val", **kwargs: Any
) -> dict[str, Any]:
    """Per-class and overall top-1 of a checkpoint on ``data`` (default: its training data)."""
    ckpt = load_checkpoint(checkpoint)
    data = data or ckpt.config.get("data")
    if not data:
        raise UsageError("no --data given and the checkpoint records none")
    return evaluate_model(
        model_from_checkpoint(ckpt),
        Preprocess.from_card(ckpt.card.preprocessing),
        ckpt.card.classes,
        data,
        split,
        **kwargs,
    )


def evaluate_weights(
    weights: str | Path,
    arch: str,
    data: str | Path,
    split: str = "val",
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a raw state dict of ``arch``; its normalization is given or known."""
    path = Path(weights)
    state, _ = read_state_dict_file(path)
    known = known_weights(path)
    if mean is None or std is None:
        if known is None:
            raise UsageError(
                f"{path} is not a known published file: give --mean and --std, "
                "the normalization the weights were trained with"
            )
        mean, std = list(known["mean"]), list(known["std"])
    if known and known["arch"] != arch:
        raise UsageError(f"{path} holds {known['arch']} weights, not {arch}")
    head_w = state.get(f"{get_arch(arch).head}.weight")
    if head_w is None:
        raise UsageError(f"{path} has no {get_arch(arch).head} layer: not a full {arch}")
    model = build_model(arch, int(head_w.shape[0]))
    load_backbone(model, arch, state, str(path))
    spec = get_arch(arch)
    pre = Preprocess(
        resize=spec.resize, crop=spec.crop, mean=tuple(mean), std=tuple(std), augment=spec.augment
    )
    return evaluate_model(model, pre, None, data, split, **kwargs)
