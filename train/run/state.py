"""What a training run works with, as two plain objects (timm's way: functions over
state, no class hierarchy).

:class:`TrainJob` holds the run's fixed inputs, resolved from its config before any work
(data path, dataset kind, processes, device, precision); :class:`RunState` everything
``train.run._setup.build_state`` builds from them (model, data, optimization) and what the
run has done so far (next epoch, history, best epoch), which the epoch functions update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from train.config import TrainConfig
from train.data.preprocess import Preprocess
from train.models.checkpoint import Checkpoint
from train.models.pretrained import PretrainedInfo
from train.run._distributed import DistInfo
from train.run.precision import Precision


@dataclass(frozen=True)
class TrainJob:
    """A run's fixed inputs: its config and what was resolved from it."""

    cfg: TrainConfig
    out: Path
    data: str  # --data, resolved (../shared/data/X or the local download)
    kind: str  # the dataset kind (imagefolder, npz, cifar10, cifar100)
    dist: DistInfo
    device: torch.device
    precision: Precision
    cached: bool  # feature-extract on cached backbone features


@dataclass
class RunState:
    """A run's model, data and optimization, and its progress."""

    job: TrainJob
    classes: list[str]
    options: dict[str, Any]  # the architecture's build options (recorded in the card)
    resume_ckpt: Checkpoint | None
    info: PretrainedInfo
    arch: str  # the architecture trained (after an `auto` fallback)
    pre: Preprocess
    model: nn.Module
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper
    feature_extract: bool
    frozen: list[nn.Module]  # kept in eval mode while training (frozen blocks)
    train_ds: Dataset
    val_ds: Dataset
    loader_gen: torch.Generator
    sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    val_criterion: nn.Module
    ema: AveragedModel | None = None  # the weight EMA, started after the linear probe
    # the run's progress: the next epoch, the metrics rows so far and the best row
    start_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    lp_val_acc: float | None = None  # the linear probe's val accuracy (LP-FT)

    @property
    def cfg(self) -> TrainConfig:
        return self.job.cfg

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved: the EMA weights when ``ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.model
