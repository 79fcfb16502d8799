"""Optimizers and per-epoch learning-rate schedules (with optional linear warmup)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch.optim import lr_scheduler as S

from train.config import TrainConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay), Adam or AdamW."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    betas = cast(tuple[float, float], tuple(cfg.betas))  # two values: Adam unpacks them
    return cls(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


class InverseTime:
    """lr factor 1 / (1 + decay * epoch) (a picklable LambdaLR function)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, epoch: int) -> float:
        return 1.0 / (1.0 + self.decay * epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> S.LRScheduler:
    """The main schedule over the epochs after warmup, stepped once per epoch."""
    main_epochs = max(1, cfg.epochs - cfg.warmup_epochs)
    if cfg.schedule == "step":
        step = cfg.in_epochs(cfg.step_size)
        main: S.LRScheduler = S.StepLR(optimizer, step_size=step, gamma=cfg.gamma)
    elif cfg.schedule == "multistep":
        milestones = [cfg.in_epochs(m) - cfg.warmup_epochs for m in cfg.milestones]
        main = S.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    elif cfg.schedule == "exponential":
        main = S.ExponentialLR(optimizer, gamma=cfg.gamma)
    elif cfg.schedule == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=cfg.min_lr)
    elif cfg.schedule == "inverse-time":
        main = S.LambdaLR(optimizer, InverseTime(cfg.decay))
    else:
        main = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.warmup_epochs <= 0:
        return main
    warmup = S.LinearLR(
        optimizer, start_factor=cfg.warmup_start, end_factor=1.0, total_iters=cfg.warmup_epochs
    )
    return S.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_epochs])
