"""The training run: data, model, optimizer, epochs, checkpoints, metrics and plots.

One process, or one per device under ``torchrun`` (DistributedDataParallel; only
rank 0 writes). Feature-extract mode trains the head on cached backbone features.

:class:`Run` is the entry point (the CLI's and the tests'): it resolves the config's
:class:`~train.run.state.TrainJob`, then :meth:`Run.fit` builds the
:class:`~train.run.state.RunState` (``_setup.py``) and runs the epochs over it as plain
functions: ``_epochs.py`` (one epoch: full, on cached features, the linear probe),
``report.py`` (history, best epoch, checkpoints, log lines, summary), ``_card.py`` (model
card, checkpoint, resolved config) and ``outputs.py`` (the files in ``OUT``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from serve.backend.errors import UsageError
from serve.core import hints
from serve.core.errors import SetupError
from train.config import TrainConfig
from train.data.datasets import detect_kind
from train.models.archs import get_arch
from train.run._card import resolved_config
from train.run._distributed import barrier, cleanup, init_distributed
from train.run._epochs import (
    EpochOutcome,
    cache_features,
    cached_epoch,
    full_epoch,
    linear_probe_stage,
)
from train.run._setup import build_state, resolve_data, start_ema
from train.run.outputs import RunOutputs, finished_run
from train.run.precision import Precision
from train.run.report import announce, finish, open_tensorboard, record_epoch
from train.run.state import RunState, TrainJob

log = logging.getLogger(__name__)


def prepare(cfg: TrainConfig) -> TrainJob:
    """The run's fixed inputs, resolved before any work: an unknown arch, a missing
    ``--data``, an absent CUDA device or an indivisible batch fail here."""
    get_arch(cfg.arch)  # an unknown arch fails before any work, listing the known ones
    data = resolve_data(cfg.data)
    # a missing --data is named before the out folder's state (the likelier mistake)
    kind = detect_kind(data, cfg.dataset)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if use_cuda else "cpu")
    device = torch.device(f"cuda:{dist.local_rank}" if use_cuda else "cpu")
    if cfg.batch_size % dist.world_size:
        raise UsageError(
            f"batch_size {cfg.batch_size} (global) is not divisible by {dist.world_size} processes"
        )
    cached = cfg.mode == "feature-extract" and cfg.cache_features
    if cached and dist.enabled:
        raise UsageError(
            "feature caching runs in one process; use --no-cache-features with torchrun"
        )
    return TrainJob(
        cfg=cfg,
        out=Path(cfg.out or f"runs/{cfg.model_name}"),
        data=data,
        kind=kind,
        dist=dist,
        device=device,
        precision=Precision(device, cfg.amp, cfg.channels_last),
        cached=cached,
    )


class Run:
    """One training run configured by a (validated) :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.job = prepare(cfg)
        job = self.job
        # as config.yaml records them (resolved_config): data and device resolved
        settings = {**cfg.to_dict(), "data": job.data, "device": str(job.device)}
        # OUT holds a finished run of these exact settings: nothing to train (re-runnable
        # `make train export`); any other occupied OUT is still refused by RunOutputs.
        self.finished = None if cfg.resume or cfg.overwrite else finished_run(job.out, settings)
        self.outputs = (
            RunOutputs(job.out, bool(cfg.resume), cfg.overwrite, settings)
            if job.dist.is_main and self.finished is None
            else None
        )
        self.state: RunState | None = None  # built by fit

    @property
    def model(self) -> nn.Module:
        """The model trained (its live weights)."""
        assert self.state is not None, "fit() builds the model"
        return self.state.model

    @property
    def ema(self) -> AveragedModel | None:
        """The weight EMA (``ema_decay``), whose weights are evaluated and saved."""
        assert self.state is not None, "fit() builds the model"
        return self.state.ema

    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns the summary (also written to ``summary.json``)."""
        t0 = time.perf_counter()
        if self.finished is not None:
            cleanup(self.job.dist)
            log.info(
                "%s already holds a finished run of these exact settings (best val acc %.2f%% at "
                "epoch %s): nothing to train; %s trains it again, another %s keeps both",
                self.job.out,
                100 * float(self.finished.get("best_val_acc") or 0),
                self.finished.get("best_epoch"),
                hints.flag("--overwrite"),
                "OUT" if hints.via_make() else "--out",
            )
            return self.finished
        try:
            self.state = build_state(self.job)
            return self._fit(self.state, t0)
        finally:
            cleanup(self.job.dist)

    def _fit(self, state: RunState, t0: float) -> dict[str, Any]:
        cfg, outputs = self.cfg, self.outputs
        writer = None
        if outputs is not None:
            announce(state)
            outputs.start(resolved_config(state), state.history)
            writer = open_tensorboard(state)
        cache = cache_features(state) if self.job.cached else None
        confusion: list[list[int]] | None = None
        if cfg.mode == "finetune" and cfg.lp_epochs:
            confusion = self._probe_stage(state, writer)
        if cfg.ema_decay and not self.job.cached:
            start_ema(state)
        for epoch in range(state.start_epoch, cfg.epochs + 1):
            te = time.perf_counter()
            lr = state.optimizer.param_groups[0]["lr"]
            result = cached_epoch(state, epoch, cache) if cache else self._epoch_full(epoch)
            state.scheduler.step()
            if outputs is not None:
                confusion = record_epoch(state, outputs, epoch, lr, te, result, writer) or confusion
            barrier(self.job.dist)
        if writer is not None:
            writer.close()
        if outputs is None:
            return {}
        if state.best is None:
            raise UsageError(
                f"nothing to train: start epoch {state.start_epoch} > epochs {cfg.epochs}"
            )
        return finish(state, outputs, t0, confusion)

    def _epoch_full(self, epoch: int) -> EpochOutcome:
        """One full epoch (train, then validate); a seam the tests interrupt."""
        assert self.state is not None
        return full_epoch(self.state, epoch)

    def _probe_stage(self, state: RunState, writer: Any) -> list[list[int]] | None:
        """LP-FT's linear probe, recorded as epoch 0; a resumed run has done it already.
        Returns epoch 0's confusion matrix when this process recorded it as the best."""
        if state.resume_ckpt is not None:
            # every LP-FT checkpoint is saved after the probe (epoch 0): done already
            lp_rows = [r for r in state.history if r["epoch"] == 0]
            state.lp_val_acc = lp_rows[0]["val_acc"] if lp_rows else None
            return None
        te = time.perf_counter()
        lp = linear_probe_stage(state)
        if self.outputs is None:
            return None
        return record_epoch(state, self.outputs, 0, self.cfg.lp_lr, te, lp, writer) or None
