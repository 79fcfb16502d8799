"""One epoch of training and one pass of evaluation, with tqdm progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from train.progress import progress


@dataclass
class EpochResult:
    """Mean loss and accuracy over the samples seen."""

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
    *,
    desc: str = "train",
    max_batches: int = 0,
    set_train_mode: Callable[[bool], None] | None = None,
) -> EpochResult:
    """Train for one pass over ``loader`` (or its first ``max_batches`` batches)."""
    if set_train_mode is not None:
        set_train_mode(True)
    else:
        model.train()
    total = _limit(len(loader), max_batches)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = progress(loader, total=total, desc=desc)
    for i, (x, y) in enumerate(bar):
        if i >= total:
            break
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = criterion(logits, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return EpochResult(loss_sum / max(seen, 1), correct / max(seen, 1), seen)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module | None = None,
    *,
    desc: str = "val",
    max_batches: int = 0,
) -> tuple[EpochResult, torch.Tensor, torch.Tensor]:
    """Evaluate in eval mode; returns the result plus all predictions and targets."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    total = _limit(len(loader), max_batches)
    loss_sum, seen = 0.0, 0
    preds, targets = [], []
    bar = progress(loader, total=total, desc=desc)
    for i, (x, y) in enumerate(bar):
        if i >= total:
            break
        logits = model(x)
        loss_sum += criterion(logits, y).item() * len(y)
        seen += len(y)
        preds.append(logits.argmax(1))
        targets.append(y)
    bar.close()
    p = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    t = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    acc = (p == t).sum().item() / seen if seen else 0.0
    return EpochResult(loss_sum / max(seen, 1), acc, seen), p, t
