"""Fine-tuning helpers beyond the tutorial: LP-FT, top-block fine-tuning, frozen BatchNorm,
weight EMA.

* LP-FT (Kumar et al. 2022): train the new head on cached frozen-backbone features first
  (:func:`linear_probe`), then fine-tune; the backbone is not distorted by a random head.
* ``train_blocks``: only the top N blocks (and everything after them) train
  (:func:`freeze_below`); the frozen bottom costs no backward pass and its BatchNorm layers
  stay in eval mode.
* ``frozen_bn``: every BatchNorm keeps its pretrained statistics (small batches).
* ``head_init``: the new head starts from the pretrained ImageNet classifier's rows of the
  matching classes (ants/bees: ImageNet 310 "ant", 309 "bee") instead of random weights:
  the pretrained model's own knowledge of those classes is the starting point.
* ``ema_decay``: ``torch.optim.swa_utils.AveragedModel`` with an EMA per optimizer step;
  the EMA weights (buffers included) are what is evaluated and saved.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from serve.backend.errors import UsageError
from train.engine import EpochResult
from train.feature_cache import FeatureCache, train_head_epoch

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
    from train.models import build_model, get_head, head_parameter_names
    from train.pretrained import (
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


def linear_probe(
    head: nn.Linear,
    cache: FeatureCache,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    criterion: nn.Module,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[EpochResult, EpochResult, torch.Tensor, torch.Tensor]:
    """Train ``head`` on cached features: SGD with momentum, cosine lr to 0 over ``epochs``.
    Returns the last epoch's (train, val, val predictions, val targets)."""
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    val_criterion = nn.CrossEntropyLoss()
    if epochs < 1:
        raise UsageError(f"linear probe needs epochs >= 1, got {epochs}")
    for epoch in range(1, epochs + 1):
        result = train_head_epoch(
            head, cache, epoch, opt, criterion, val_criterion, batch_size, generator, device
        )
        sched.step()
        log.debug("LP epoch %d: train acc %.4f, val acc %.4f", epoch, result[0].acc, result[1].acc)
    return result


def make_ema(model: nn.Module, decay: float, optimizer: torch.optim.Optimizer) -> AveragedModel:
    """An EMA copy of ``model`` (parameters and buffers) updated after every optimizer step."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(_opt: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        ema.update_parameters(model)

    optimizer.register_step_post_hook(update)
    return ema
