"""A training run's state, built from its job before the first epoch.

The model (pretrained, or the checkpoint's when resuming), its preprocessing, what
trains and what stays frozen, the DistributedDataParallel wrapper, the loaders, the
optimizer, scheduler and loss; and, when resuming, the state the run continues from
(:func:`build_state`). Also the weight EMA (:func:`start_ema`), made after the linear probe.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from serve.backend.errors import UsageError
from train.config import TrainConfig
from train.data.datasets import classes_of, dataset_split, subset
from train.data.preprocess import Preprocess
from train.models.archs import arch_options, build_model, get_arch, get_head
from train.models.checkpoint import Checkpoint, load_checkpoint, set_rng_state
from train.models.finetune import freeze_below, init_head_from_imagenet
from train.models.pretrained import PretrainedInfo, resolve_pretrained
from train.run.optim import build_optimizer, build_scheduler
from train.run.state import RunState, TrainJob

log = logging.getLogger(__name__)

SHARED_PREFIX = "../shared/data/"


def resolve_data(data: str) -> str:
    """``../shared/data/X`` when present, else the local download location ``data/X``."""
    if data.startswith(SHARED_PREFIX) and not Path(data).exists():
        local = "data/" + data[len(SHARED_PREFIX) :]
        if Path(local).exists():
            return local
    return data


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (and ask for deterministic kernels if requested)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def preprocess_for(cfg: TrainConfig, arch: str, info: PretrainedInfo) -> Preprocess:
    """The run's preprocessing: the config's settings, else the weights' mean/std, else
    the architecture's defaults."""
    spec = get_arch(arch)
    return Preprocess(
        resize=cfg.resize or spec.resize,
        crop=cfg.crop or spec.crop,
        mean=tuple(cfg.mean or info.mean or spec.mean),
        std=tuple(cfg.std or info.std or spec.std),
        augment=cfg.augment or spec.augment,
        rrc_scale=(cfg.rrc_scale[0], cfg.rrc_scale[1]),
        auto_augment=cfg.auto_augment,
    )


def split(job: TrainJob, name: str, transform: Any) -> Dataset:
    """The job's ``train`` or ``val`` split through ``transform``."""
    return dataset_split(job.data, name, transform, job.kind, job.cfg.download)


def build_state(job: TrainJob) -> RunState:
    """Seed, then build the model, the data and the optimization (in this order: the
    random draws of each depend on it); a resumed run's state restored last."""
    cfg = job.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed + job.dist.rank, cfg.deterministic)
    classes = classes_of(split(job, "train", None))
    options = arch_options(
        cfg.arch, cfg.batchnorm, cfg.dropout, cfg.inception, cfg.aux_weight > 0, cfg.width
    )
    resume = _load_resume(cfg, classes, options) if cfg.resume else None
    # the model
    if resume is not None:
        model, info, arch = _resumed_model(resume, len(classes), options)
    else:
        model, info, arch = _pretrained_model(cfg, len(classes), options)
    pre = preprocess_for(cfg, arch, info)
    feature_extract, frozen = _place_and_freeze(job, model, arch)
    train_model = model
    if job.dist.enabled:
        model, train_model = _wrap_distributed(job, model)
    # the data
    train_ds = subset(split(job, "train", pre.train_transform()), cfg.train_subset, cfg.seed)
    # A fixed val subset, whatever the seed: `evaluate --limit N` sees the same images.
    val_ds = subset(split(job, "val", pre.eval_transform()), cfg.val_subset, 0)
    val_classes = classes_of(val_ds)
    if val_classes != classes:
        raise UsageError(
            f"train classes {classes} and val classes {val_classes} differ in {job.data}"
        )
    loader_gen = torch.Generator().manual_seed(cfg.seed + 1000 * job.dist.rank)
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_ds,
        num_replicas=job.dist.world_size,
        rank=job.dist.rank,
        shuffle=True,
        seed=cfg.seed,
    )
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size // job.dist.world_size,
        sampler=sampler,
        num_workers=cfg.workers,
        generator=loader_gen,
        pin_memory=job.device.type == "cuda",
    )
    val_loader = DataLoader(
        val_ds, batch_size=max(cfg.batch_size, 32), shuffle=False, num_workers=cfg.workers
    )
    # the optimization
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    state = RunState(
        job=job,
        classes=classes,
        options=options,
        resume_ckpt=resume,
        info=info,
        arch=arch,
        pre=pre,
        model=model,
        train_model=train_model,
        feature_extract=feature_extract,
        frozen=frozen,
        train_ds=train_ds,
        val_ds=val_ds,
        loader_gen=loader_gen,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg),
        scaler=job.precision.scaler(),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        val_criterion=nn.CrossEntropyLoss(),
    )
    if resume is not None:
        _restore(state, resume)
    return state


def _load_resume(cfg: TrainConfig, classes: list[str], options: dict[str, Any]) -> Checkpoint:
    ckpt = load_checkpoint(cfg.resume)
    problems = []
    if ckpt.card.classes != classes:
        problems.append(f"classes {ckpt.card.classes} vs data {classes}")
    if ckpt.card.arch_options != options:
        problems.append(f"arch options {ckpt.card.arch_options} vs {options}")
    # cfg.arch may be what was asked for before an `auto` fallback switched arch.
    if cfg.arch not in (ckpt.card.arch, ckpt.config.get("arch")):
        problems.append(f"checkpoint arch {ckpt.card.arch} vs requested {cfg.arch}")
    if ckpt.optimizer is None:
        problems.append("no optimizer state")
    if problems:
        raise UsageError(f"cannot resume from {cfg.resume}: " + "; ".join(problems))
    return ckpt


def _resumed_model(
    ckpt: Checkpoint, num_classes: int, options: dict[str, Any]
) -> tuple[nn.Module, PretrainedInfo, str]:
    """The checkpoint's architecture with the weights the optimizer was stepping."""
    p = ckpt.card.provenance.pretrained
    info = PretrainedInfo(
        p.requested,
        p.arch,
        p.source,
        p.fallback,
        p.note,
        tuple(p.mean) if p.mean else None,
        tuple(p.std) if p.std else None,
    )
    model = build_model(ckpt.card.arch, num_classes, **options)
    # the live weights the optimizer steps (with EMA, state_dict holds the EMA's)
    model.load_state_dict(ckpt.train_weights or ckpt.state_dict)
    return model, info, ckpt.card.arch


def _pretrained_model(
    cfg: TrainConfig, num_classes: int, options: dict[str, Any]
) -> tuple[nn.Module, PretrainedInfo, str]:
    """The requested weights (or the offline fallback), the head optionally started
    from the ImageNet classifier's rows."""
    model, info = resolve_pretrained(
        cfg.arch, cfg.pretrained, num_classes, timeout=cfg.download_timeout, options=options
    )
    if cfg.head_init:
        init_head_from_imagenet(model, info.arch, list(cfg.head_init), cfg.download_timeout)
    return model, info, info.arch


def _place_and_freeze(job: TrainJob, model: nn.Module, arch: str) -> tuple[bool, list[nn.Module]]:
    """The model onto its device and memory format; what stays frozen for the mode.
    Returns (feature-extract?, the frozen modules)."""
    cfg = job.cfg
    model.to(job.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    feature_extract = cfg.mode == "feature-extract"
    if feature_extract:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in get_head(model, arch).parameters():
            p.requires_grad_(True)
    return feature_extract, [] if feature_extract else freeze_below(model, cfg.train_blocks)


def _wrap_distributed(job: TrainJob, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model (SyncBatchNorm first if asked) and the DistributedDataParallel model
    that trains it."""
    if job.cfg.sync_bn:  # BatchNorm statistics over the global batch (CUDA only)
        if job.device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA devices")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [job.device.index] if job.device.type == "cuda" else None
    return model, nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _restore(state: RunState, ckpt: Checkpoint) -> None:
    """A resumed run's optimizer, scheduler, scaler, history, best and RNG state."""
    assert ckpt.optimizer is not None  # _load_resume refuses a checkpoint without one
    state.optimizer.load_state_dict(ckpt.optimizer)
    if ckpt.scheduler:
        state.scheduler.load_state_dict(ckpt.scheduler)
    if ckpt.scaler and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt.scaler)
    state.start_epoch = ckpt.epoch + 1
    state.history = list(ckpt.history)
    state.best = dict(ckpt.best) if ckpt.best else None
    if ckpt.rng:
        set_rng_state(ckpt.rng, state.loader_gen)
    log.info("resumed from %s at epoch %d", state.cfg.resume, state.start_epoch)


def make_ema(model: nn.Module, decay: float, optimizer: torch.optim.Optimizer) -> AveragedModel:
    """An EMA copy of ``model`` (parameters and buffers) updated after every optimizer step."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(_opt: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        ema.update_parameters(model)

    optimizer.register_step_post_hook(update)
    return ema


def start_ema(state: RunState) -> None:
    """The weight EMA, from the checkpoint's averaged weights when resuming."""
    state.ema = make_ema(state.model, state.cfg.ema_decay, state.optimizer)
    ckpt = state.resume_ckpt
    if ckpt is not None and ckpt.ema_steps:
        state.ema.module.load_state_dict(ckpt.state_dict)
        state.ema.n_averaged.fill_(ckpt.ema_steps)
