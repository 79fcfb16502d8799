"""Served accuracy: send a labelled ImageFolder through the live server and score it.

Files are listed exactly like the training data loader's ImageFolder (sorted class
folders, sorted walk, the served formats' extensions), so the result is comparable image
for image with the in-process evaluation of the same checkpoint (``python -m train
evaluate``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve.backend.errors import UsageError
from serve.backend.preprocess import IMAGE_EXTENSIONS
from serve.client.client import Classifier


@dataclass
class ServedEvaluation:
    """Per-image predictions of a served model on a labelled folder."""

    classes: list[str]
    paths: list[str]
    targets: np.ndarray
    predictions: np.ndarray  # -1 where the server returned an error
    errors: dict[str, str]

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.targets).mean()) if len(self.targets) else 0.0

    def per_class(self) -> dict[str, float]:
        return {
            c: float((self.predictions[self.targets == i] == i).mean())
            for i, c in enumerate(self.classes)
            if (self.targets == i).any()
        }

    def confusion(self) -> list[list[int]]:
        n = len(self.classes)
        cm = np.zeros((n, n), dtype=int)
        for t, p in zip(self.targets, self.predictions, strict=True):
            if p >= 0:
                cm[t, p] += 1
        return cm.tolist()

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "images": len(self.paths),
            "errors": len(self.errors),
            "per_class": self.per_class(),
            "confusion": self.confusion(),
            "classes": self.classes,
        }


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index)]) in torchvision ImageFolder order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UsageError(f"{root} has no class subfolders (expected {root}/<class>/*.jpg)")
    samples = []
    for index, name in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), index))
    return classes, samples


def evaluate_served(clf: Classifier, root: str | Path, batch_size: int = 16) -> ServedEvaluation:
    """Classify every image of ``root`` (an ImageFolder split) through ``clf``'s server."""
    classes, samples = list_image_folder(root)
    paths = [p for p, _ in samples]
    targets = np.array([t for _, t in samples])
    preds = np.full(len(samples), -1)
    errors: dict[str, str] = {}
    for start in range(0, len(samples), batch_size):
        chunk = paths[start : start + batch_size]
        for j, result in enumerate(clf.classify_each(chunk, top_k=1)):
            if isinstance(result, Exception):
                errors[chunk[j]] = str(result)
                continue
            label = result[0].label
            if label not in classes:
                raise UsageError(
                    f"the server's label {label!r} is not a class folder of {root} ({classes})"
                )
            preds[start + j] = classes.index(label)
    return ServedEvaluation(classes, paths, targets, preds, errors)
