"""Feature-extract mode without redundant work: the frozen backbone runs once per image
(and per augmented view), the head trains on the cached features.

In feature-extract mode the backbone is frozen and in eval mode, so its output for a
given input never changes; caching it is exact. ``views`` random augmentations of every
training image are computed up front (epoch e uses view e mod views); with ``views=0``
the eval transform is used and there is no augmentation.

LP-FT (Kumar et al. 2022) trains the new head on these cached features first
(:func:`linear_probe`), then fine-tunes: the backbone is not distorted by a random head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from serve.backend.errors import UsageError
from train.models.archs import get_arch, get_head
from train.run.loop import EpochResult, predict, summarize
from train.run.precision import Precision

log = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """Backbone outputs: ``train`` [views, N, D], ``val`` [M, D], and targets."""

    train: torch.Tensor
    train_targets: torch.Tensor
    val: torch.Tensor
    val_targets: torch.Tensor

    @property
    def views(self) -> int:
        return self.train.shape[0]


class _Backbone(nn.Module):
    """``model`` with its head swapped for Identity (restored on ``restore``)."""

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        self.model, self.arch = model, arch
        self.head = get_head(model, arch)
        model.set_submodule(get_arch(arch).head, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def restore(self) -> None:
        self.model.set_submodule(get_arch(self.arch).head, self.head)


def compute_features(
    model: nn.Module,
    arch: str,
    train_views: list[Dataset],
    val: Dataset,
    precision: Precision,
    batch_size: int = 64,
    workers: int = 2,
    generator: torch.Generator | None = None,
) -> FeatureCache:
    """Run the frozen backbone over every view of the training set and over val."""
    backbone = _Backbone(model, arch)
    # channels_last: faster convolutions on CPU, tensor cores on GPU (docs/training.md).
    precision = Precision(precision.device, precision.amp, channels_last=True)
    model.to(memory_format=torch.channels_last)
    try:
        train_feats, train_targets = [], None
        for v, ds in enumerate(train_views):
            loader = DataLoader(
                ds, batch_size=batch_size, shuffle=False, num_workers=workers, generator=generator
            )
            feats, targets = predict(
                backbone, loader, precision, desc=f"features train view {v + 1}/{len(train_views)}"
            )
            train_feats.append(feats)
            train_targets = targets
        val_loader = DataLoader(val, batch_size=batch_size, num_workers=workers)
        val_feats, val_targets = predict(backbone, val_loader, precision, desc="features val")
    finally:
        backbone.restore()
        model.to(memory_format=torch.contiguous_format)
    assert train_targets is not None
    return FeatureCache(torch.stack(train_feats), train_targets, val_feats, val_targets)


def train_head_epoch(
    head: nn.Module,
    cache: FeatureCache,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    val_criterion: nn.Module,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    max_batches: int = 0,
) -> tuple[EpochResult, EpochResult, torch.Tensor, torch.Tensor]:
    """One epoch of the head on view ``(epoch - 1) % views`` of the cached train features,
    then its val result; returns (train, val, val predictions, val targets)."""
    head.train()
    feats = cache.train[(epoch - 1) % cache.views]
    order = torch.randperm(len(feats), generator=generator)
    n_batches = (len(order) + batch_size - 1) // batch_size
    if max_batches:
        n_batches = min(n_batches, max_batches)
    loss_sum, correct, seen = 0.0, 0, 0
    for b in range(n_batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        x, y = feats[idx].to(device), cache.train_targets[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = head(x)
        loss = criterion(logits, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    head.eval()
    with torch.no_grad():
        val_logits = head(cache.val.to(device)).float().cpu()
    va = summarize(val_logits, cache.val_targets, val_criterion)
    train = EpochResult(loss_sum / max(seen, 1), correct / max(seen, 1), seen)
    return train, va, val_logits.argmax(1), cache.val_targets


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
