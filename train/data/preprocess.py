"""A model's preprocessing: the eval geometry and normalization it records, and the
training transforms (the PyTorch transfer-learning recipe's and CIFAR's augmentation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision import transforms as T

from serve.backend.errors import UsageError
from serve.backend.preprocess import DEFAULT_INTERPOLATION
from serve.core.card import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("random-resized-crop", "pad-crop", "none")
AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels: stored in checkpoints and exported models.

    Eval path: decode -> EXIF orientation -> RGB -> Resize(resize, shorter side)
    -> CenterCrop(crop) -> [0, 1] -> (x - mean) / std. Exported graphs take the
    pixels in 0..255 after the crop and do the scaling and normalization inside.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN  # 3 values (checked)
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = DEFAULT_INTERPOLATION
    augment: str = "random-resized-crop"
    padding: int = 4
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    auto_augment: str = "none"  # torchvision TrivialAugmentWide / RandAugment after the crop

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise UsageError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.auto_augment not in AUTO_AUGMENTS:
            raise UsageError(
                f"auto_augment must be one of {AUTO_AUGMENTS}, got {self.auto_augment!r}"
            )
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"rrc_scale must be 0 < min <= max <= 1, got {self.rrc_scale}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UsageError(f"mean/std need 3 values each, std > 0 (got {self.mean}, {self.std})")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (mean/std as lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["rrc_scale"] = list(self.rrc_scale)
        return d

    def card_preprocessing(self) -> Preprocessing:
        """The eval part, as the model card records it (the caller normalizes)."""
        return Preprocessing(
            self.resize, self.crop, list(self.mean), list(self.std), self.interpolation, "input"
        )

    def augment_settings(self) -> dict[str, Any]:
        """The training-only part (kept in the checkpoint beside the card)."""
        return {
            "augment": self.augment,
            "padding": self.padding,
            "rrc_scale": list(self.rrc_scale),
            "auto_augment": self.auto_augment,
        }

    @classmethod
    def from_card(cls, pre: Preprocessing, augment: dict[str, Any] | None = None) -> Preprocess:
        """The transforms of a model card's preprocessing (+ a checkpoint's augment)."""
        augment = augment or {}
        return cls(
            resize=pre.resize,
            crop=pre.crop,
            mean=tuple(pre.mean),
            std=tuple(pre.std),
            interpolation=pre.interpolation,
            augment=str(augment.get("augment", "random-resized-crop")),
            padding=int(augment.get("padding", 4)),
            rrc_scale=tuple(augment.get("rrc_scale", (0.08, 1.0))),
            auto_augment=str(augment.get("auto_augment", "none")),
        )

    def _interp(self) -> T.InterpolationMode:
        return T.InterpolationMode(self.interpolation)

    def train_transform(self) -> T.Compose:
        """Augmentation + normalize. ``random-resized-crop``: RandomResizedCrop(crop) + flip
        (ImageNet recipes); ``pad-crop``: Resize + RandomCrop(crop, padding) + flip (CIFAR);
        ``none``: the eval transform. ``auto_augment`` adds torchvision's TrivialAugmentWide
        or RandAugment after the crop and flip."""
        if self.augment == "random-resized-crop":
            steps: list[Any] = [
                T.RandomResizedCrop(
                    self.crop, scale=tuple(self.rrc_scale), interpolation=self._interp()
                ),
                T.RandomHorizontalFlip(),
            ]
        elif self.augment == "pad-crop":
            steps = [
                T.Resize(self.resize, interpolation=self._interp()),
                T.RandomCrop(self.crop, padding=self.padding),
                T.RandomHorizontalFlip(),
            ]
        else:
            return self.eval_transform()
        if self.auto_augment == "trivialaugment":
            steps.append(T.TrivialAugmentWide(interpolation=self._interp()))
        elif self.auto_augment == "randaugment":
            steps.append(T.RandAugment(interpolation=self._interp()))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def eval_transform(self, normalize: bool = True) -> T.Compose:
        """Resize + CenterCrop, then either normalized floats or raw 0..255 float pixels."""
        steps: list[Any] = [
            T.Resize(self.resize, interpolation=self._interp()),
            T.CenterCrop(self.crop),
        ]
        if normalize:
            steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        else:
            steps += [T.PILToTensor(), _ToFloat()]
        return T.Compose(steps)


class _ToFloat:
    """uint8 tensor -> float32 with the same values (0..255), as exported graphs expect."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32)
