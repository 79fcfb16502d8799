"""One epoch of a training run, in each of its forms, as functions of the run's state.

A full epoch trains the (possibly DDP-wrapped) model on the loader and validates on the
main process (:func:`full_epoch`); a cached epoch trains the head alone on frozen-backbone
features (:func:`cached_epoch`: feature-extract mode with ``cache_features``); the linear
probe, LP-FT's first stage, trains the head on cached features before fine-tuning and is
recorded as epoch 0 (:func:`linear_probe_stage`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from train.data.datasets import subset
from train.models.archs import get_head
from train.models.finetune import batchnorms
from train.run._feature_cache import FeatureCache, compute_features, linear_probe, train_head_epoch
from train.run._setup import split
from train.run.loop import EpochResult, train_one_epoch, validate
from train.run.state import RunState

log = logging.getLogger(__name__)


@dataclass
class EpochOutcome:
    """One epoch's train/val results and the val predictions."""

    train: EpochResult
    val: EpochResult
    preds: torch.Tensor
    targets: torch.Tensor


def set_train_mode(state: RunState, training: bool) -> None:
    """Fine-tune: everything trains. Feature-extract: the frozen backbone stays in eval
    mode (BatchNorm statistics fixed), only the head trains."""
    state.train_model.train(training and not state.feature_extract)
    if training:
        for m in state.frozen + (batchnorms(state.model) if state.cfg.frozen_bn else []):
            m.eval()
    get_head(state.model, state.arch).train(training)


def full_epoch(state: RunState, epoch: int) -> EpochOutcome:
    """Train one pass over the loader, then validate (main process only)."""
    cfg, job = state.cfg, state.job
    state.sampler.set_epoch(epoch)
    tr = train_one_epoch(
        state.train_model,
        state.train_loader,
        state.criterion,
        state.optimizer,
        job.precision,
        state.scaler,
        dist_info=job.dist,
        desc=f"epoch {epoch}/{cfg.epochs} train",
        max_batches=cfg.max_train_batches,
        set_train_mode=lambda training: set_train_mode(state, training),
        aux_weight=cfg.aux_weight,
    )
    if not job.dist.is_main:
        return EpochOutcome(tr, EpochResult(0.0, 0.0, 0), torch.empty(0), torch.empty(0))
    va, preds, targets = validate(
        state.eval_model,
        state.val_loader,
        state.val_criterion,
        job.precision,
        desc=f"epoch {epoch} val",
        max_batches=cfg.max_val_batches,
    )
    return EpochOutcome(tr, va, preds, targets)


def cached_epoch(state: RunState, epoch: int, cache: FeatureCache) -> EpochOutcome:
    """The head alone, one epoch on the cached features, then its val result."""
    tr, va, preds, targets = train_head_epoch(
        get_head(state.model, state.arch),
        cache,
        epoch,
        state.optimizer,
        state.criterion,
        state.val_criterion,
        state.cfg.batch_size,
        state.loader_gen,
        state.job.device,
        state.cfg.max_train_batches,
    )
    return EpochOutcome(tr, va, preds, targets)


def cache_features(state: RunState) -> FeatureCache:
    """The frozen backbone's features of every training view and of val."""
    cfg, job, pre = state.cfg, state.job, state.pre
    views = cfg.feature_views
    if views > 0 and pre.augment != "none":
        train_views = [split(job, "train", pre.train_transform()) for _ in range(views)]
    else:
        train_views = [split(job, "train", pre.eval_transform())]
    train_views = [subset(ds, cfg.train_subset, cfg.seed) for ds in train_views]
    t = time.perf_counter()
    # A seeded generator fixes every augmented view: the cache (and a resume) is stable.
    with torch.random.fork_rng():  # workers=0 draws from the global RNG
        torch.manual_seed(cfg.seed)
        cache = compute_features(
            state.model,
            state.arch,
            train_views,
            state.val_ds,
            job.precision,
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


def linear_probe_stage(state: RunState) -> EpochOutcome:
    """LP-FT's first stage: the head alone, on cached frozen-backbone features. Its
    result is recorded as epoch 0 (a checkpoint like any epoch's)."""
    cfg, t = state.cfg, time.perf_counter()
    cache = cache_features(state)
    tr, va, preds, targets = linear_probe(
        get_head(state.model, state.arch),
        cache,
        cfg.lp_epochs,
        cfg.lp_lr,
        cfg.momentum,
        cfg.lp_batch_size,
        state.criterion,
        state.loader_gen,
        state.job.device,
    )
    if cfg.channels_last:  # compute_features leaves the model contiguous
        state.model.to(memory_format=torch.channels_last)
    state.lp_val_acc = va.acc
    log.info(
        "linear probe: %d epochs on %d cached view(s), val acc %.2f%% (%.1fs)",
        cfg.lp_epochs,
        cache.views,
        100 * va.acc,
        time.perf_counter() - t,
    )
    return EpochOutcome(tr, va, preds, targets)
