"""The training run: data, model, optimizer, epochs, checkpoints, metrics and plots.

One process, or one per device under ``torchrun`` (DistributedDataParallel; only
rank 0 writes). Feature-extract mode trains the head on cached backbone features.

:class:`Run` is the entry point and holds the epoch loop; its pieces live by role in
``run_setup.py`` (model, data and optimization; a resume's state), ``run_epochs.py``
(one epoch: full, on cached features, the linear probe), ``run_card.py`` (model card,
checkpoints, resolved config) and ``run_report.py`` (history, best epoch, log lines,
summary).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from serve.backend.errors import UsageError
from serve.core import hints
from serve.core.errors import SetupError
from train.config import TrainConfig
from train.datasets import detect_kind
from train.distributed import barrier, cleanup, init_distributed
from train.engine import Precision
from train.finetune import make_ema
from train.models import get_arch
from train.run_epochs import RunEpochs
from train.run_outputs import RunOutputs, finished_run
from train.run_report import RunReport
from train.run_setup import resolve_data

# the public names, whichever module now defines them (other code imports them from here)
__all__ = ["Run"]

log = logging.getLogger(__name__)


class Run(RunEpochs, RunReport):
    """One training run configured by a :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        get_arch(cfg.arch)  # an unknown arch fails before any work, listing the known ones
        self.cfg = cfg
        self.out = Path(cfg.out or f"runs/{cfg.model_name}")
        self.data = resolve_data(cfg.data)
        # a missing --data is named before the out folder's state (the likelier mistake)
        self.kind = detect_kind(self.data, cfg.dataset)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise SetupError("--device cuda but no CUDA device is available")
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if use_cuda else "cpu")
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if use_cuda else "cpu")
        self.precision = Precision(self.device, cfg.amp, cfg.channels_last)
        if cfg.batch_size % self.dist.world_size:
            raise UsageError(
                f"batch_size {cfg.batch_size} (global) is not divisible by "
                f"{self.dist.world_size} processes"
            )
        self.cached = cfg.mode == "feature-extract" and cfg.cache_features
        if self.cached and self.dist.enabled:
            raise UsageError(
                "feature caching runs in one process; use --no-cache-features with torchrun"
            )
        # as config.yaml records them (_resolved_config): data and device resolved
        settings = {**cfg.to_dict(), "data": self.data, "device": str(self.device)}
        # OUT holds a finished run of these exact settings: nothing to train (re-runnable
        # `make train export`); any other occupied OUT is still refused by RunOutputs.
        self.finished = None if cfg.resume or cfg.overwrite else finished_run(self.out, settings)
        self.outputs = (
            RunOutputs(self.out, bool(cfg.resume), cfg.overwrite, settings)
            if self.dist.is_main and self.finished is None
            else None
        )

    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns the summary (also written to ``summary.json``)."""
        t0 = time.perf_counter()
        if self.finished is not None:
            cleanup(self.dist)
            log.info(
                "%s already holds a finished run of these exact settings (best val acc %.2f%% at "
                "epoch %s): nothing to train; %s trains it again, another %s keeps both",
                self.out,
                100 * float(self.finished.get("best_val_acc") or 0),
                self.finished.get("best_epoch"),
                hints.flag("--overwrite"),
                "OUT" if hints.via_make() else "--out",
            )
            return self.finished
        try:
            self._setup()
            return self._fit(t0)
        finally:
            cleanup(self.dist)

    def _fit(self, t0: float) -> dict[str, Any]:
        cfg, outputs = self.cfg, self.outputs
        if outputs is not None:
            self._announce()
            outputs.start(self._resolved_config(), self.history)
        writer = self._tensorboard()
        cache = self._features() if self.cached else None
        confusion: list[list[int]] | None = None
        if cfg.mode == "finetune" and cfg.lp_epochs:
            confusion = self._probe_stage(writer)
        if cfg.ema_decay and not self.cached:
            self._start_ema()
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            te = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            result = self._epoch_cached(epoch, cache) if cache else self._epoch_full(epoch)
            self.scheduler.step()
            if outputs is not None:
                confusion = self._record(epoch, lr, te, result, writer) or confusion
            barrier(self.dist)
        if writer is not None:
            writer.close()
        if outputs is None:
            return {}
        if self.best is None:
            raise UsageError(
                f"nothing to train: start epoch {self.start_epoch} > epochs {cfg.epochs}"
            )
        return self._summarize(t0, confusion)

    def _probe_stage(self, writer: Any) -> list[list[int]] | None:
        """LP-FT's linear probe, recorded as epoch 0; a resumed run has done it already.
        Returns epoch 0's confusion matrix when this process recorded it as the best."""
        if self.resume_ckpt is not None:
            # every LP-FT checkpoint is saved after the probe (epoch 0): done already
            lp_rows = [r for r in self.history if r["epoch"] == 0]
            self.lp_val_acc = lp_rows[0]["val_acc"] if lp_rows else None
            return None
        te = time.perf_counter()
        lp = self._linear_probe()
        if self.outputs is None:
            return None
        return self._record(0, self.cfg.lp_lr, te, lp, writer) or None

    def _start_ema(self) -> None:
        """The weight EMA, from the checkpoint's averaged weights when resuming."""
        self.ema = make_ema(self.model, self.cfg.ema_decay, self.optimizer)
        if self.resume_ckpt is not None and self.resume_ckpt.ema_steps:
            self.ema.module.load_state_dict(self.resume_ckpt.state_dict)
            self.ema.n_averaged.fill_(self.resume_ckpt.ema_steps)
