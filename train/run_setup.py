"""A training run's pieces, built from its config before the first epoch.

The model (pretrained, or the checkpoint's when resuming), its preprocessing, what
trains and what stays frozen, the DistributedDataParallel wrapper, the loaders, the
optimizer, scheduler and loss; and, when resuming, the state the run continues from.
:class:`RunSetup` is the base of :class:`train.trainer.Run`, which sets the attributes
annotated at the top of the class before :meth:`RunSetup._setup` builds the rest.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from serve.backend.errors import UsageError
from train.checkpoint import Checkpoint, load_checkpoint, set_rng_state
from train.config import TrainConfig
from train.data import Preprocess
from train.datasets import dataset_split, subset
from train.distributed import DistInfo
from train.engine import Precision
from train.finetune import batchnorms, freeze_below, init_head_from_imagenet
from train.models import arch_options, build_model, get_arch, get_head
from train.optim import build_optimizer, build_scheduler
from train.pretrained import PretrainedInfo, resolve_pretrained
from train.run_outputs import RunOutputs

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


class RunSetup:
    """Builds a run's model, data and optimization, and restores a resumed run's state."""

    # set by Run.__init__
    cfg: TrainConfig
    out: Path
    data: str
    kind: str
    dist: DistInfo
    device: torch.device
    precision: Precision
    cached: bool
    outputs: RunOutputs | None
    # set by _setup
    classes: list[str]
    options: dict[str, Any]
    resume_ckpt: Checkpoint | None
    info: PretrainedInfo
    arch: str
    model: nn.Module
    train_model: nn.Module
    ema: AveragedModel | None  # the weight EMA, made in Run._fit
    pre: Preprocess
    feature_extract: bool
    frozen: list[nn.Module]
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
    # the run's progress: the next epoch, the metrics rows so far and the best row
    start_epoch: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed + self.dist.rank, cfg.deterministic)
        probe = dataset_split(self.data, "train", None, self.kind, cfg.download)
        self.classes = list(probe.classes)
        self.options = arch_options(
            cfg.arch, cfg.batchnorm, cfg.dropout, cfg.inception, cfg.aux_weight > 0, cfg.width
        )
        self.resume_ckpt = self._load_resume() if cfg.resume else None
        self._build_model()
        self._build_data()
        self._build_optimization()
        self.start_epoch, self.history, self.best = 1, [], None
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)

    def _load_resume(self) -> Checkpoint:
        ckpt = load_checkpoint(self.cfg.resume)
        problems = []
        if ckpt.card.classes != self.classes:
            problems.append(f"classes {ckpt.card.classes} vs data {self.classes}")
        if ckpt.card.arch_options != self.options:
            problems.append(f"arch options {ckpt.card.arch_options} vs {self.options}")
        # cfg.arch may be what was asked for before an `auto` fallback switched arch.
        if self.cfg.arch not in (ckpt.card.arch, ckpt.config.get("arch")):
            problems.append(f"checkpoint arch {ckpt.card.arch} vs requested {self.cfg.arch}")
        if ckpt.optimizer is None:
            problems.append("no optimizer state")
        if problems:
            raise UsageError(f"cannot resume from {self.cfg.resume}: " + "; ".join(problems))
        return ckpt

    # -- the model ------------------------------------------------------------------------
    def _build_model(self) -> None:
        if self.resume_ckpt is not None:
            self.model, self.info, self.arch = self._resumed_model(self.resume_ckpt)
        else:
            self.model, self.info, self.arch = self._pretrained_model()
        self.pre = preprocess_for(self.cfg, self.arch, self.info)
        self._place_and_freeze()
        self.ema = None  # made after the linear probe (see Run._fit)
        self.train_model = self.model
        if self.dist.enabled:
            self.train_model = self._wrap_distributed()

    def _resumed_model(self, ckpt: Checkpoint) -> tuple[nn.Module, PretrainedInfo, str]:
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
        model = build_model(ckpt.card.arch, len(self.classes), **self.options)
        # the live weights the optimizer steps (with EMA, state_dict holds the EMA's)
        model.load_state_dict(ckpt.train_weights or ckpt.state_dict)
        return model, info, ckpt.card.arch

    def _pretrained_model(self) -> tuple[nn.Module, PretrainedInfo, str]:
        """The requested weights (or the offline fallback), the head optionally started
        from the ImageNet classifier's rows."""
        cfg = self.cfg
        model, info = resolve_pretrained(
            cfg.arch,
            cfg.pretrained,
            len(self.classes),
            timeout=cfg.download_timeout,
            options=self.options,
        )
        if cfg.head_init:
            init_head_from_imagenet(model, info.arch, list(cfg.head_init), cfg.download_timeout)
        return model, info, info.arch

    def _place_and_freeze(self) -> None:
        """The model onto its device and memory format; what stays frozen for the mode."""
        cfg = self.cfg
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.feature_extract = cfg.mode == "feature-extract"
        if self.feature_extract:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in get_head(self.model, self.arch).parameters():
                p.requires_grad_(True)
        self.frozen = [] if self.feature_extract else freeze_below(self.model, cfg.train_blocks)

    def _wrap_distributed(self) -> nn.Module:
        """The DistributedDataParallel model that trains (SyncBatchNorm first if asked)."""
        if self.cfg.sync_bn:  # BatchNorm statistics over the global batch (CUDA only)
            if self.device.type != "cuda":
                raise UsageError("--sync-bn needs CUDA devices")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _set_train_mode(self, training: bool) -> None:
        """Fine-tune: everything trains. Feature-extract: the frozen backbone stays in
        eval mode (BatchNorm statistics fixed), only the head trains."""
        self.train_model.train(training and not self.feature_extract)
        if training:
            for m in self.frozen + (batchnorms(self.model) if self.cfg.frozen_bn else []):
                m.eval()
        get_head(self.model, self.arch).train(training)

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved: the EMA weights when ``ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.model

    # -- data and optimization ------------------------------------------------------------
    def _split(self, split: str, transform: Any) -> Dataset:
        return dataset_split(self.data, split, transform, self.kind, self.cfg.download)

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_ds = subset(
            self._split("train", self.pre.train_transform()), cfg.train_subset, cfg.seed
        )
        # A fixed val subset, whatever the seed: `evaluate --limit N` sees the same images.
        self.val_ds = subset(self._split("val", self.pre.eval_transform()), cfg.val_subset, 0)
        if list(self.val_ds.classes) != self.classes:
            raise UsageError(
                f"train classes {self.classes} and val classes "
                f"{list(self.val_ds.classes)} differ in {self.data}"
            )
        self.loader_gen = torch.Generator().manual_seed(cfg.seed + 1000 * self.dist.rank)
        self.sampler = DistributedSampler(
            self.train_ds,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            shuffle=True,
            seed=cfg.seed,
        )
        self.train_loader = DataLoader(
            self.train_ds,
            batch_size=cfg.batch_size // self.dist.world_size,
            sampler=self.sampler,
            num_workers=cfg.workers,
            generator=self.loader_gen,
            pin_memory=self.device.type == "cuda",
        )
        self.val_loader = DataLoader(
            self.val_ds, batch_size=max(cfg.batch_size, 32), shuffle=False, num_workers=cfg.workers
        )

    def _build_optimization(self) -> None:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = self.precision.scaler()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.val_criterion = nn.CrossEntropyLoss()

    def _restore(self, ckpt: Checkpoint) -> None:
        """A resumed run's optimizer, scheduler, scaler, history, best and RNG state."""
        self.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scheduler:
            self.scheduler.load_state_dict(ckpt.scheduler)
        if ckpt.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt.scaler)
        self.start_epoch = ckpt.epoch + 1
        self.history = list(ckpt.history)
        self.best = dict(ckpt.best) if ckpt.best else None
        if ckpt.rng:
            set_rng_state(ckpt.rng, self.loader_gen)
        log.info("resumed from %s at epoch %d", self.cfg.resume, self.start_epoch)
