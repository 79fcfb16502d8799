"""The training run: data, model, optimizer, epochs, checkpoints, metrics and plots.

One process, or one per device under ``torchrun`` (DistributedDataParallel; only
rank 0 writes). Feature-extract mode trains the head on cached backbone features.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from serve.core.contract import Metrics, ModelCard, Pretrained, Provenance, redact_paths
from serve.core.errors import SetupError, UsageError
from train.checkpoint import Checkpoint, load_checkpoint, rng_state, set_rng_state
from train.config import TrainConfig
from train.data import Preprocess
from train.datasets import dataset_split, detect_kind, subset
from train.distributed import DistInfo, barrier, cleanup, init_distributed
from train.engine import EpochResult, Precision, evaluate, train_one_epoch
from train.feature_cache import FeatureCache, compute_features, train_head_epoch
from train.finetune import (
    batchnorms,
    freeze_below,
    init_head_from_imagenet,
    linear_probe,
    make_ema,
)
from train.models import arch_options, build_model, get_arch, get_head
from train.optim import build_optimizer, build_scheduler
from train.pretrained import PretrainedInfo, resolve_pretrained
from train.run_outputs import RunOutputs, banner, finished_run

log = logging.getLogger(__name__)

SHARED_PREFIX = "../shared/data/"
PATH_KEYS = ("data", "out", "resume", "recipe")  # machine-local: not in the model card


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


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, n: int) -> list[list[int]]:
    """counts[true][predicted]."""
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((targets, preds), torch.ones_like(targets), accumulate=True)
    return cm.tolist()


def is_better(val_acc: float, val_loss: float, best: dict[str, Any] | None) -> bool:
    """Higher val accuracy wins; on a tie, lower val loss."""
    if best is None:
        return True
    return val_acc > best["val_acc"] or (val_acc == best["val_acc"] and val_loss < best["val_loss"])


@dataclass
class EpochOutcome:
    """One epoch's train/val results and the val predictions."""

    train: EpochResult
    val: EpochResult
    preds: torch.Tensor
    targets: torch.Tensor


class Run:
    """One training run configured by a :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        get_arch(cfg.arch)  # an unknown arch fails before any work, listing the known ones
        self.cfg = cfg
        self.out = Path(cfg.out or f"runs/{cfg.model_name}")
        self.data = resolve_data(cfg.data)
        # a missing --data is named before the out folder's state (the likelier mistake)
        self.kind: str = detect_kind(self.data, cfg.dataset)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise SetupError("--device cuda but no CUDA device is available")
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist: DistInfo = init_distributed("cuda" if use_cuda else "cpu")
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

    # -- setup ----------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed + self.dist.rank, cfg.deterministic)
        probe = dataset_split(self.data, "train", None, self.kind, cfg.download)
        self.classes: list[str] = list(probe.classes)
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

    def _build_model(self) -> None:
        cfg = self.cfg
        if self.resume_ckpt is not None:
            p = self.resume_ckpt.card.provenance.pretrained
            self.info = PretrainedInfo(
                p.requested,
                p.arch,
                p.source,
                p.fallback,
                p.note,
                tuple(p.mean) if p.mean else None,
                tuple(p.std) if p.std else None,
            )
            self.arch = self.resume_ckpt.card.arch
            self.model = build_model(self.arch, len(self.classes), **self.options)
            # the live weights the optimizer steps (with EMA, state_dict holds the EMA's)
            ckpt = self.resume_ckpt
            self.model.load_state_dict(ckpt.train_weights or ckpt.state_dict)
        else:
            self.model, self.info = resolve_pretrained(
                cfg.arch,
                cfg.pretrained,
                len(self.classes),
                timeout=cfg.download_timeout,
                options=self.options,
            )
            self.arch = self.info.arch
            if cfg.head_init:
                init_head_from_imagenet(
                    self.model, self.arch, list(cfg.head_init), cfg.download_timeout
                )
        spec = get_arch(self.arch)
        self.pre = Preprocess(
            resize=cfg.resize or spec.resize,
            crop=cfg.crop or spec.crop,
            mean=tuple(cfg.mean or self.info.mean or spec.mean),
            std=tuple(cfg.std or self.info.std or spec.std),
            augment=cfg.augment or spec.augment,
            rrc_scale=(cfg.rrc_scale[0], cfg.rrc_scale[1]),
            auto_augment=cfg.auto_augment,
        )
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
        self.ema: nn.Module | None = None  # made after the linear probe (see _fit)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            if cfg.sync_bn:  # BatchNorm statistics over the global batch (CUDA only)
                if self.device.type != "cuda":
                    raise UsageError("--sync-bn needs CUDA devices")
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

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

    # -- the card and checkpoints ---------------------------------------------------------
    def card(self, metrics: Metrics) -> ModelCard:
        """The model card as of now (export completes it)."""
        cfg, info = self.cfg, self.info
        pretrained = Pretrained(
            redact_paths(info.requested),
            info.arch,
            redact_paths(info.source),
            info.fallback,
            redact_paths(info.note),
            list(info.mean) if info.mean else None,
            list(info.std) if info.std else None,
        )
        settings = {
            k: redact_paths(v) if isinstance(v, str) else v
            for k, v in cfg.to_dict().items()
            if k not in PATH_KEYS
        }
        provenance = Provenance(
            pretrained=pretrained,
            recipe=Path(cfg.recipe).stem if cfg.recipe else "",
            mode=cfg.mode,
            seed=cfg.seed,
            epochs=cfg.epochs,
            dataset=Path(self.data).name,
            training=settings,
            torch_version=str(torch.__version__),
        )
        pre = self.pre.card_preprocessing()
        return ModelCard.create(
            name=cfg.model_name,
            arch=self.arch,
            classes=self.classes,
            resize=pre.resize,
            crop=pre.crop,
            mean=pre.mean,
            std=pre.std,
            interpolation=pre.interpolation,
            arch_options=self.options,
            provenance=provenance,
            metrics=metrics,
        )

    def _checkpoint(self, epoch: int, metrics: Metrics) -> Checkpoint:
        return Checkpoint(
            card=self.card(metrics),
            state_dict={
                k: v.detach().cpu().clone() for k, v in self.eval_model.state_dict().items()
            },
            epoch=epoch,
            config={**self.cfg.to_dict(), "data": self.data, "arch_used": self.arch},
            history=list(self.history),
            best=dict(self.best) if self.best else None,
            augment=self.pre.augment_settings(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            rng=rng_state(self.loader_gen),
            train_weights=(
                {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                if self.ema is not None
                else None
            ),
            ema_steps=int(self.ema.n_averaged) if self.ema is not None else 0,
        )

    def _resolved_config(self) -> dict[str, Any]:
        return {
            **self.cfg.to_dict(),
            "data": self.data,
            "dataset_kind": self.kind,
            "arch_used": self.arch,
            "arch_options": self.options,
            "pretrained_info": self.info.to_dict(),
            "preprocess": self.pre.to_dict(),
            "classes": self.classes,
            "world_size": self.dist.world_size,
            "device": str(self.device),
        }

    # -- epochs ---------------------------------------------------------------------------
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
            "linear probe: %d epochs on %d cached view(s), val acc %.4f (%.1fs)",
            cfg.lp_epochs,
            cache.views,
            self.lp_val_acc,
            time.perf_counter() - t,
        )
        return EpochOutcome(tr, va, preds, targets)

    # -- the run --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns the summary (also written to ``summary.json``)."""
        t0 = time.perf_counter()
        if self.finished is not None:
            cleanup(self.dist)
            log.info(
                "%s already holds a finished run of these exact settings (best val acc %s at "
                "epoch %s): nothing to train; --overwrite (TRAIN_ARGS=--overwrite) trains it "
                "again, another OUT keeps both",
                self.out,
                self.finished.get("best_val_acc"),
                self.finished.get("best_epoch"),
            )
            return self.finished
        try:
            self._setup()
            return self._fit(t0)
        finally:
            cleanup(self.dist)

    def _announce(self) -> None:
        cfg = self.cfg
        if self.info.fallback:
            banner(f"PRETRAINED=auto: {self.info.note}")
        procs = f" x{self.dist.world_size} processes" if self.dist.enabled else ""
        amp = f", amp {cfg.amp}" if cfg.amp != "none" else ""
        log.info(
            "model %s: arch %s %s, mode %s, %d classes, weights: %s\n"
            "data %s (%s): %d train / %d val images; device %s%s%s; out %s",
            cfg.model_name,
            self.arch,
            self.options or "",
            cfg.mode,
            len(self.classes),
            self.info.source,
            self.data,
            self.kind,
            len(self.train_ds),
            len(self.val_ds),
            self.device,
            procs,
            amp,
            self.out,
        )

    def _fit(self, t0: float) -> dict[str, Any]:
        cfg, outputs = self.cfg, self.outputs
        if outputs is not None:
            self._announce()
            outputs.start(self._resolved_config(), self.history)
        writer = self._tensorboard()
        cache = self._features() if self.cached else None
        confusion: list[list[int]] | None = None
        if cfg.mode == "finetune" and cfg.lp_epochs:
            if self.resume_ckpt is None:
                te = time.perf_counter()
                lp = self._linear_probe()
                if outputs is not None:
                    confusion = self._record(0, cfg.lp_lr, te, lp, writer) or confusion
            else:  # every LP-FT checkpoint is saved after the probe (epoch 0): done already
                lp_rows = [r for r in self.history if r["epoch"] == 0]
                self.lp_val_acc = lp_rows[0]["val_acc"] if lp_rows else None
        if cfg.ema_decay and not self.cached:
            self.ema = make_ema(self.model, cfg.ema_decay, self.optimizer)
            if self.resume_ckpt is not None and self.resume_ckpt.ema_steps:
                self.ema.module.load_state_dict(self.resume_ckpt.state_dict)
                self.ema.n_averaged.fill_(self.resume_ckpt.ema_steps)
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

    def _tensorboard(self) -> Any:
        if self.outputs is None or not self.cfg.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"))

    def _record(
        self, epoch: int, lr: float, te: float, r: EpochOutcome, writer: Any
    ) -> list[list[int]] | None:
        """Metrics row, checkpoints, curves and the log line of one epoch (main process).
        Returns the confusion matrix when this epoch is the new best."""
        assert self.outputs is not None
        row = {
            "epoch": epoch,
            "train_loss": r.train.loss,
            "train_acc": r.train.acc,
            "val_loss": r.val.loss,
            "val_acc": r.val.acc,
            "lr": lr,
            "seconds": time.perf_counter() - te,
        }
        self.history.append(row)
        improved = is_better(r.val.acc, r.val.loss, self.best)
        confusion = None
        if improved:
            self.best = dict(row)
            confusion = confusion_matrix(r.preds, r.targets, len(self.classes))
        assert self.best is not None
        metrics = Metrics(
            best_val_acc=self.best["val_acc"],
            best_val_loss=self.best["val_loss"],
            best_epoch=self.best["epoch"],
            val_images=r.val.samples,
            confusion=confusion,
        )
        title = f"{self.cfg.model_name} ({self.arch}, {self.cfg.mode})"
        self.outputs.epoch(row, self._checkpoint(epoch, metrics), improved, title)
        if writer is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                writer.add_scalar(key, row[key], epoch)
        log.info(
            "epoch %3d/%d  lr %.2e  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.1fs%s",
            epoch,
            self.cfg.epochs,
            lr,
            r.train.loss,
            r.train.acc,
            r.val.loss,
            r.val.acc,
            row["seconds"],
            "  *best*" if improved else "",
        )
        return confusion

    def _summarize(self, t0: float, confusion: list[list[int]] | None) -> dict[str, Any]:
        cfg, best = self.cfg, self.best
        assert best is not None and self.outputs is not None
        summary = {
            "model_name": cfg.model_name,
            "arch": self.arch,
            "mode": cfg.mode,
            "best_val_acc": best["val_acc"],
            "best_epoch": best["epoch"],
            "epochs": cfg.epochs,
            "seconds": time.perf_counter() - t0,
            "pretrained": self.info.to_dict(),
            "checkpoint": str(self.out / "checkpoint.pt"),
            "world_size": self.dist.world_size,
            "feature_cache": bool(self.cached),
            "lp_val_acc": getattr(self, "lp_val_acc", None),
        }
        self.outputs.finish(
            summary, confusion, self.classes, f"{cfg.model_name} val, epoch {best['epoch']}"
        )
        if self.info.fallback:
            banner(
                f"NOTE: trained on the offline backbone {self.arch}, not {cfg.arch} "
                f"({self.info.note.split(':')[0]})"
            )
        log.info(
            "done: best val acc %.4f at epoch %d (%s, %s, %s); %.1fs total; checkpoint %s",
            best["val_acc"],
            best["epoch"],
            cfg.model_name,
            self.arch,
            cfg.mode,
            summary["seconds"],
            summary["checkpoint"],
        )
        return summary
