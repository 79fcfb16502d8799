"""One epoch of a training run, in each of its forms.

A full epoch trains the (possibly DDP-wrapped) model on the loader and validates on the
main process; a cached epoch trains the head alone on frozen-backbone features
(feature-extract mode with ``cache_features``); the linear probe, LP-FT's first stage,
trains the head on cached features before fine-tuning and is recorded as epoch 0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from train.datasets import subset
from train.engine import EpochResult, evaluate, train_one_epoch
from train.feature_cache import FeatureCache, compute_features, train_head_epoch
from train.finetune import linear_probe
from train.models import get_head
from train.run_setup import RunSetup

log = logging.getLogger(__name__)


@dataclass
class EpochOutcome:
    """One epoch's train/val results and the val predictions."""

    train: EpochResult
    val: EpochResult
    preds: torch.Tensor
    targets: torch.Tensor


class RunEpochs(RunSetup):
    """The epochs of a run: full, on cached features, and the linear probe."""

    lp_val_acc: float | None  # the linear probe's val accuracy (LP-FT)

    def _epoch_full(self, epoch: int) -> EpochOutcome:
        self.sampler.set_epoch(epoch)
        tr = train_one_epoch(
            self.train_model,
            self.train_loader,
            self.criterion,
            self.optimizer,
            self.precision,
            self.scaler,
            dist_info=self.dist,
            desc=f"epoch {epoch}/{self.cfg.epochs} train",
            max_batches=self.cfg.max_train_batches,
            set_train_mode=self._set_train_mode,
            aux_weight=self.cfg.aux_weight,
        )
        if not self.dist.is_main:
            return EpochOutcome(tr, EpochResult(0.0, 0.0, 0), torch.empty(0), torch.empty(0))
        va, preds, targets = evaluate(
            self.eval_model,
            self.val_loader,
            self.val_criterion,
            self.precision,
            desc=f"epoch {epoch} val",
            max_batches=self.cfg.max_val_batches,
        )
        return EpochOutcome(tr, va, preds, targets)

    def _epoch_cached(self, epoch: int, cache: FeatureCache) -> EpochOutcome:
        tr, va, preds, targets = train_head_epoch(
            get_head(self.model, self.arch),
            cache,
            epoch,
            self.optimizer,
            self.criterion,
            self.val_criterion,
            self.cfg.batch_size,
            self.loader_gen,
            self.device,
            self.cfg.max_train_batches,
        )
        return EpochOutcome(tr, va, preds, targets)

    def _features(self) -> FeatureCache:
        cfg = self.cfg
        views = cfg.feature_views
        if views > 0 and self.pre.augment != "none":
            train_views = [self._split("train", self.pre.train_transform()) for _ in range(views)]
        else:
            train_views = [self._split("train", self.pre.eval_transform())]
        train_views = [subset(ds, cfg.train_subset, cfg.seed) for ds in train_views]
        t = time.perf_counter()
        # A seeded generator fixes every augmented view: the cache (and a resume) is stable.
        with torch.random.fork_rng():  # workers=0 draws from the global RNG
            torch.manual_seed(cfg.seed)
            cache = compute_features(
                self.model,
                self.arch,
                train_views,
                self.val_ds,
                self.precision,
                workers=cfg.workers,
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        log.info(
            "cached frozen-backbone features: %d view(s) x %d train + %d val images, dim %d, %.1fs",
            cache.views,
            cache.train.shape[1],
            len(cache.val),
            cache.train.shape[-1],
            time.perf_counter() - t,
        )
        return cache

    def _linear_probe(self) -> EpochOutcome:
        """LP-FT's first stage: the head alone, on cached frozen-backbone features. Its
        result is recorded as epoch 0 (a checkpoint like any epoch's)."""
        cfg, t = self.cfg, time.perf_counter()
        cache = self._features()
        tr, va, preds, targets = linear_probe(
            get_head(self.model, self.arch),
            cache,
            cfg.lp_epochs,
            cfg.lp_lr,
            cfg.momentum,
            cfg.lp_batch_size,
            self.criterion,
            self.loader_gen,
            self.device,
        )
        if cfg.channels_last:  # compute_features leaves the model contiguous
            self.model.to(memory_format=torch.channels_last)
        self.lp_val_acc = va.acc
        log.info(
            "linear probe: %d epochs on %d cached view(s), val acc %.2f%% (%.1fs)",
            cfg.lp_epochs,
            cache.views,
            100 * self.lp_val_acc,
            time.perf_counter() - t,
        )
        return EpochOutcome(tr, va, preds, targets)
