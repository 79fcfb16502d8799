"""Where images come from: an ImageFolder, NumPy archives, or torchvision's CIFAR-10/100.

``--data`` names the source; ``--dataset auto`` recognises it:

* a folder with ``train/`` and ``val/`` class subfolders -> ImageFolder;
* a ``.npz`` file (``x`` uint8 [N, H, W, 3] RGB, ``y`` int [N]) -> that one split, class
  names from ``classes.txt`` beside it;
* a folder of such archives -> ``train.npz`` (else ``train_subset_5k.npz``) and ``test.npz``
  (or ``val.npz``) as the val split;
* a folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` -> torchvision's
  CIFAR10 / CIFAR100 (``--dataset cifar10 --download`` fetches it when online).
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from serve.backend.errors import UsageError
from serve.backend.preprocess import IMAGE_EXTENSIONS, load_image
from serve.core.sampling import stratified
from train.data.preprocess import Preprocess

KINDS = ("auto", "imagefolder", "npz", "cifar10", "cifar100")
NPZ_TRAIN = ("train.npz", "train_subset_5k.npz")
NPZ_VAL = ("val.npz", "test.npz")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode a served-format image, apply EXIF orientation, convert to RGB.

    The same decoder the (torch-free) client and the server use, so training,
    evaluation and serving see identical pixels. Raises ImageError naming the file.
    """
    return load_image(path)



def is_image_file(path: str) -> bool:
    """True for the file extensions we read (see IMAGE_EXTENSIONS), case-insensitive."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def check_image_folder(root: Path, split: str) -> Path:
    """Return ``root/split`` after checking it is an ImageFolder with class subfolders."""
    split_dir = root / split
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"data folder {root} has no '{split}/' subfolder (expected {root}/train/<class>/*.jpg "
            f"and {root}/val/<class>/*.jpg)"
        )
    classes = [p for p in split_dir.iterdir() if p.is_dir()]
    if not classes:
        raise UsageError(
            f"{split_dir} has no class subfolders (expected {split_dir}/<class>/*.jpg)"
        )
    return split_dir


def image_folder(root: Path, split: str, transform: Any) -> datasets.ImageFolder:
    """An ImageFolder over ``root/split`` that reads every image as RGB via :func:`load_rgb`."""
    return datasets.ImageFolder(
        str(check_image_folder(root, split)),
        transform=transform,
        loader=load_rgb,
        is_valid_file=is_image_file,
    )


def build_datasets(
    root: str | Path, pre: Preprocess
) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """Train and val datasets for an ImageFolder root; their class lists must agree."""
    root = Path(root)
    train = image_folder(root, "train", pre.train_transform())
    val = image_folder(root, "val", pre.eval_transform())
    if train.classes != val.classes:
        raise UsageError(
            f"train classes {train.classes} and val classes {val.classes} differ in {root}"
        )
    return train, val


class ArrayDataset(Dataset):
    """Images held as a uint8 [N, H, W, 3] array; items go through ``transform`` as PIL."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, classes: list[str], transform: Any, source: str = ""
    ) -> None:
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise UsageError(f"{source}: x must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise UsageError(f"{source}: {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise UsageError(f"{source}: labels outside 0..{len(classes) - 1}")
        self.x, self.targets = x, [int(v) for v in y]
        self.classes, self.transform, self.source = classes, transform, source

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self.x[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def detect_kind(data: str | Path, kind: str = "auto") -> str:
    """Resolve ``auto`` by looking at the path; explain what was expected if nothing fits."""
    if kind not in KINDS:
        raise UsageError(f"dataset must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    p = Path(data)
    if p.suffix == ".npz":
        return "npz"
    if not p.exists():
        raise FileNotFoundError(f"data folder {p} does not exist")
    if (p / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (p / "cifar-100-python").is_dir():
        return "cifar100"
    if any((p / n).is_file() for n in NPZ_TRAIN + NPZ_VAL):
        return "npz"
    return "imagefolder"


def _npz_file(data: Path, split: str) -> Path:
    if data.suffix == ".npz":
        if not data.is_file():
            raise FileNotFoundError(f"{data} does not exist")
        return data
    names = NPZ_TRAIN if split == "train" else NPZ_VAL
    for name in names:
        if (data / name).is_file():
            return data / name
    raise FileNotFoundError(f"{data} has none of {', '.join(names)} for the {split} split")


def npz_classes(path: Path, num_classes: int) -> list[str]:
    """Class names from ``classes.txt`` beside the archive, else class_0..class_{n-1}."""
    txt = path.parent / "classes.txt"
    if txt.is_file():
        names = [ln.strip() for ln in txt.read_text().splitlines() if ln.strip()]
        if len(names) < num_classes:
            raise UsageError(f"{txt} lists {len(names)} classes, labels need {num_classes}")
        return names
    return [f"class_{i}" for i in range(num_classes)]


def load_npz(path: Path, transform: Any) -> ArrayDataset:
    """An ArrayDataset from an ``x``/``y`` archive."""
    with np.load(path) as d:
        if "x" not in d or "y" not in d:
            raise UsageError(f"{path} must hold arrays 'x' and 'y' (has {list(d.keys())})")
        x, y = d["x"], d["y"].astype(np.int64)
    return ArrayDataset(
        x, y, npz_classes(path, int(y.max()) + 1 if len(y) else 0), transform, str(path)
    )


def dataset_split(
    data: str | Path, split: str, transform: Any, kind: str = "auto", download: bool = False
) -> Dataset:
    """One split (``train`` or ``val``) of a source; the dataset has ``classes`` and
    ``targets`` attributes."""
    data = Path(data)
    kind = detect_kind(data, kind)
    if kind == "imagefolder":
        return image_folder(data, split, transform)
    if kind == "npz":
        return load_npz(_npz_file(data, split), transform)
    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    try:
        return cls(str(data), train=split == "train", transform=transform, download=download)
    except RuntimeError as e:  # "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{kind} not found under {data} ({e}); pass --download when "
            "online, or point --data at the NumPy archives"
        ) from e


def classes_of(ds: Dataset) -> list[str]:
    """The class names of a dataset of ours: every one names them (ImageFolder, the NumPy
    and CIFAR datasets, :func:`subset`), though torch's Dataset type does not say so."""
    return list(ds.classes)  # type: ignore[attr-defined]


def subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """A fixed stratified sample of ``n`` items (every class in proportion; all when n
    <= 0; serve/core/sampling.py), keeping classes/targets."""
    if n <= 0 or n >= len(cast(Sized, ds)):
        return ds
    sub = torch.utils.data.Subset(ds, stratified(ds.targets, n, seed))  # type: ignore[attr-defined]
    sub.classes = ds.classes  # type: ignore[attr-defined]
    sub.targets = [ds.targets[i] for i in sub.indices]  # type: ignore[attr-defined]
    return sub
