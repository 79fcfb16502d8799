"""What fine-tuning does to a pretrained model beyond the tutorial: top-block fine-tuning,
frozen BatchNorm, the head started from ImageNet rows. (LP-FT's linear probe is
``train.run._feature_cache.linear_probe``; the weight EMA ``train.run._setup.make_ema``.)

* ``train_blocks``: only the top N blocks (and everything after them) train
  (:func:`freeze_below`); the frozen bottom costs no backward pass and its BatchNorm layers
  stay in eval mode.
* ``frozen_bn``: every BatchNorm keeps its pretrained statistics (small batches).
* ``head_init``: the new head starts from the pretrained ImageNet classifier's rows of the
  matching classes (ants/bees: ImageNet 310 "ant", 309 "bee") instead of random weights:
  the pretrained model's own knowledge of those classes is the starting point.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from serve.backend.errors import UsageError

log = logging.getLogger(__name__)


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level children in order, with block containers (``nn.Sequential``
    children such as EfficientNet's ``blocks`` stages 0-6 or ResNet's ``layer1``-``layer4``
    BasicBlocks) expanded one level; parameter-free modules are left out."""
    units: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList) and len(child) > 1:
            units += [(f"{name}.{n}", c) for n, c in child.named_children()]
        elif any(True for _ in child.parameters()):
            units.append((name, child))
    return [(n, m) for n, m in units if any(True for _ in m.parameters())]


def block_names(model: nn.Module) -> list[str]:
    """Names of the expanded block-container children (what ``train_blocks`` counts)."""
    names: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList) and len(child) > 1:
            names += [f"{name}.{n}" for n, _ in child.named_children()]
    return names


def freeze_below(model: nn.Module, train_blocks: int) -> list[nn.Module]:
    """Freeze everything before the top ``train_blocks`` blocks; returns the frozen modules
    (to be kept in eval mode). ``0`` freezes nothing."""
    if train_blocks <= 0:
        return []
    names = block_names(model)
    if train_blocks > len(names):
        raise UsageError(f"train_blocks {train_blocks} > the model's {len(names)} blocks")
    first = names[len(names) - train_blocks]
    frozen: list[nn.Module] = []
    for name, module in blocks(model):
        if name == first:
            break
        module.requires_grad_(False)
        frozen.append(module)
    log.info(
        "fine-tuning the top %d of %d blocks (from %s); %d modules frozen",
        train_blocks,
        len(names),
        first,
        len(frozen),
    )
    return frozen


def init_head_from_imagenet(
    model: nn.Module, arch: str, indices: list[int], timeout: float = 15.0
) -> str:
    """Copy rows ``indices`` (one ImageNet class per class, in class order) of ``arch``'s
    pretrained 1000-class head into ``model``'s head. Returns where they came from."""
    from train.models.archs import build_model, get_head, head_parameter_names
    from train.models.pretrained import (
        OFFLINE_ARCH,
        TORCHVISION_WEIGHTS,
        efficientnet_lite0_state_dict,
        torchvision_state_dict,
    )

    head = get_head(model, arch)
    if len(indices) != head.out_features or not all(0 <= i < 1000 for i in indices):
        raise UsageError(
            f"head_init needs {head.out_features} ImageNet class indices (0-999), got {indices}"
        )
    if arch == OFFLINE_ARCH:
        state, source = efficientnet_lite0_state_dict(build_model(arch, 1000))
    elif arch in TORCHVISION_WEIGHTS:
        state, source = torchvision_state_dict(arch, timeout)
    else:
        raise UsageError(f"head_init: no ImageNet head known for arch {arch!r}")
    w_key, b_key = head_parameter_names(arch)
    with torch.no_grad():
        head.weight.copy_(state[w_key][indices])
        head.bias.copy_(state[b_key][indices])
    log.info("head initialised from ImageNet classes %s of %s", indices, source)
    return source


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
