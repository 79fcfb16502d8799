"""The epoch loop: one training pass over a loader (:func:`train_one_epoch`) and one
validation pass (:func:`validate`), on the run's device and precision, with progress bars."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from serve.backend.errors import UserError
from train.run._distributed import DistInfo, all_reduce_sum
from train.run.precision import Precision
from train.run.progress import progress


class Diverged(UserError, FloatingPointError):
    """The loss became NaN or infinite: the learning rate or the data needs a fix."""


@dataclass
class EpochResult:
    """Mean loss and accuracy over the samples seen (summed over all ranks)."""

    loss: float
    acc: float
    samples: int


def _limit(n_batches: int, max_batches: int) -> int:
    return min(n_batches, max_batches) if max_batches > 0 else n_batches


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    scaler: torch.amp.GradScaler,
    *,
    dist_info: DistInfo | None = None,
    desc: str = "train",
    max_batches: int = 0,
    set_train_mode: Callable[[bool], None] | None = None,
    aux_weight: float = 0.0,
) -> EpochResult:
    """Train for one pass over ``loader`` (or its first ``max_batches`` batches).

    A model that returns ``(logits, *aux_logits)`` in training mode (GoogLeNet's auxiliary
    classifiers) is trained on ``loss(logits) + aux_weight * sum(loss(aux))``; the reported
    loss and accuracy are the main classifier's."""
    dist_info = dist_info or DistInfo()
    if set_train_mode is not None:
        set_train_mode(True)
    else:
        model.train()
    total = _limit(len(loader), max_batches)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = progress(loader, total=total, desc=desc, disable=not dist_info.is_main)
    for i, (x, y) in enumerate(bar):
        if i >= total:
            break
        x, y = precision.inputs(x), y.to(precision.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            out = model(x)
            logits, aux = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
            main_loss = criterion(logits, y)
            loss = main_loss
            for a in aux:
                loss = loss + aux_weight * criterion(a, y)
        if not torch.isfinite(loss):
            raise Diverged(
                f"{desc}: loss is {loss.item()} at batch {i + 1}; "
                "lower the learning rate or check the data"
            )
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += main_loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum().item())
        seen += len(y)
        # refresh=False: shown at the bar's next redraw (every 30 s in logs), not per batch
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
    bar.close()
    total_loss, total_correct, total_seen = all_reduce_sum(
        [loss_sum, correct, seen], dist_info, precision.device
    )
    return EpochResult(
        total_loss / max(total_seen, 1), total_correct / max(total_seen, 1), int(total_seen)
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    precision: Precision | None = None,
    *,
    desc: str = "val",
    max_batches: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and targets for ``loader`` in eval mode."""
    precision = precision or Precision(torch.device("cpu"))
    model.eval()
    total = _limit(len(loader), max_batches)
    logits, targets = [], []
    bar = progress(loader, total=total, desc=desc)
    for i, (x, y) in enumerate(bar):
        if i >= total:
            break
        with precision.autocast():
            out = model(precision.inputs(x))
        logits.append(out.float().cpu())
        targets.append(y)
    bar.close()
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def summarize(
    logits: torch.Tensor, targets: torch.Tensor, criterion: nn.Module | None = None
) -> EpochResult:
    """Loss and top-1 of predicted logits."""
    if len(targets) == 0:
        return EpochResult(0.0, 0.0, 0)
    criterion = criterion or nn.CrossEntropyLoss()
    loss = criterion(logits, targets).item()
    acc = (logits.argmax(1) == targets).sum().item() / len(targets)
    return EpochResult(loss, acc, len(targets))


def validate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module | None = None,
    precision: Precision | None = None,
    *,
    desc: str = "val",
    max_batches: int = 0,
) -> tuple[EpochResult, torch.Tensor, torch.Tensor]:
    """Evaluate in eval mode; returns the result plus all predictions and targets."""
    logits, targets = predict(model, loader, precision, desc=desc, max_batches=max_batches)
    preds = logits.argmax(1) if len(targets) else torch.empty(0, dtype=torch.long)
    return summarize(logits, targets, criterion), preds, targets
