"""The training run: data, model, optimizer, epochs, checkpoints, metrics and plots.

One process, or one per device under ``torchrun`` (DistributedDataParallel; only
rank 0 writes). Feature-extract mode trains the head on cached backbone features.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from serve.plots import plot_confusion
from train.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.config import TrainConfig
from train.data import Preprocess
from train.datasets import dataset_split, detect_kind, subset
from train.distributed import DistInfo, barrier, cleanup, init_distributed
from train.engine import EpochResult, Precision, evaluate, summarize, train_one_epoch
from train.feature_cache import FeatureCache, compute_features
from train.models import arch_options, build_model, get_arch, get_head
from train.optim import build_optimizer, build_scheduler
from train.plots import plot_curves
from train.pretrained import PretrainedInfo, resolve_pretrained

SHARED_PREFIX = "../shared/data/"


def say(msg: str) -> None:
    """Progress/status line on stderr (stdout stays clean for results)."""
    print(msg, file=sys.stderr, flush=True)


def banner(msg: str) -> None:
    """A message nobody can miss."""
    line = "!" * 78
    say(f"\n{line}\n!! {msg}\n{line}\n")


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


def _is_better(val_acc: float, val_loss: float, best: dict[str, Any] | None) -> bool:
    """Higher val accuracy wins; on a tie, lower val loss."""
    if best is None:
        return True
    return val_acc > best["val_acc"] or (val_acc == best["val_acc"] and val_loss < best["val_loss"])


class Run:
    """One training run configured by a :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        get_arch(cfg.arch)  # an unknown arch fails before any work, listing the known ones
        self.cfg = cfg
        self.out = Path(cfg.out or f"runs/{cfg.model_name}")
        self.data = resolve_data(cfg.data)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but no CUDA device is available")
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist: DistInfo = init_distributed("cuda" if use_cuda else "cpu")
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if use_cuda else "cpu")
        self.precision = Precision(self.device, cfg.amp, cfg.channels_last)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} (global) is not divisible by "
                f"{self.dist.world_size} processes"
            )
        self.cached = cfg.mode == "feature-extract" and cfg.cache_features
        if self.cached and self.dist.enabled:
            raise ValueError(
                "feature caching runs in one process; use --no-cache-features with torchrun"
            )

    # -- setup ----------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed + self.dist.rank, cfg.deterministic)
        self.kind = detect_kind(self.data, cfg.dataset)
        probe = dataset_split(self.data, "train", None, self.kind, cfg.download)
        self.classes: list[str] = list(probe.classes)
        self.options = arch_options(cfg.arch, cfg.batchnorm, cfg.dropout)
        self.resume_ckpt: dict[str, Any] | None = None
        if cfg.resume:
            ckpt = load_checkpoint(cfg.resume)
            self._check_resumable(ckpt)
            self.resume_ckpt = ckpt
            self.info = PretrainedInfo.from_dict(ckpt["pretrained"])
            self.arch = ckpt["arch"]
            self.model = build_model(self.arch, len(self.classes), **self.options)
            self.model.load_state_dict(ckpt["state_dict"])
        else:
            self.model, self.info = resolve_pretrained(
                cfg.arch,
                cfg.pretrained,
                len(self.classes),
                timeout=cfg.download_timeout,
                options=self.options,
            )
            self.arch = self.info.arch
        spec = get_arch(self.arch)
        self.pre = Preprocess(
            resize=cfg.resize or spec.resize,
            crop=cfg.crop or spec.crop,
            mean=tuple(cfg.mean or self.info.mean or spec.mean),
            std=tuple(cfg.std or self.info.std or spec.std),
            augment=cfg.augment or spec.augment,
        )
        self.train_ds = subset(
            dataset_split(self.data, "train", self.pre.train_transform(), self.kind, cfg.download),
            cfg.train_subset,
            cfg.seed,
        )
        self.val_ds = subset(
            dataset_split(self.data, "val", self.pre.eval_transform(), self.kind, cfg.download),
            cfg.val_subset,
            0,  # a fixed val subset, whatever the seed: `evaluate --limit N` sees the same
        )
        if list(self.val_ds.classes) != self.classes:
            raise ValueError(
                f"train classes {self.classes} and val classes "
                f"{list(self.val_ds.classes)} differ in {self.data}"
            )
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.feature_extract = cfg.mode == "feature-extract"
        head = get_head(self.model, self.arch)
        if self.feature_extract:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in head.parameters():
                p.requires_grad_(True)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            if cfg.sync_bn:  # BatchNorm statistics over the global batch (CUDA only)
                if self.device.type != "cuda":
                    raise ValueError("--sync-bn needs CUDA devices")
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = self.precision.scaler()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.val_criterion = nn.CrossEntropyLoss()
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
            persistent_workers=False,
        )
        self.val_loader = DataLoader(
            self.val_ds, batch_size=max(cfg.batch_size, 32), shuffle=False, num_workers=cfg.workers
        )
        self.start_epoch, self.history, self.best = 1, [], None
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)

    def _check_resumable(self, ckpt: dict[str, Any]) -> None:
        cfg = self.cfg
        problems = []
        if ckpt["classes"] != self.classes:
            problems.append(f"classes {ckpt['classes']} vs data {self.classes}")
        if ckpt.get("arch_options", {}) != self.options:
            problems.append(f"arch options {ckpt.get('arch_options')} vs {self.options}")
        # cfg.arch may be what was asked for before an `auto` fallback switched arch.
        if cfg.arch not in (ckpt["arch"], ckpt.get("config", {}).get("arch")):
            problems.append(f"checkpoint arch {ckpt['arch']} vs requested {cfg.arch}")
        if ckpt.get("optimizer") is None:
            problems.append("no optimizer state")
        if problems:
            raise ValueError(f"cannot resume from {cfg.resume}: " + "; ".join(problems))

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.history = list(ckpt.get("history", []))
        best = ckpt.get("metrics", {}).get("best")
        self.best = dict(best) if best else None
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"], self.loader_gen)
        say(f"resumed from {self.cfg.resume} at epoch {self.start_epoch}")

    def _set_train_mode(self, training: bool) -> None:
        """Fine-tune: everything trains. Feature-extract: the frozen backbone stays in
        eval mode (BatchNorm statistics fixed), only the head trains."""
        self.train_model.train(training and not self.feature_extract)
        get_head(self.model, self.arch).train(training)

    # -- checkpoints and reports ----------------------------------------------------------
    def _checkpoint(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return make_checkpoint(
            model=self.model,
            arch=self.arch,
            classes=self.classes,
            preprocess=self.pre.to_dict(),
            pretrained=self.info.to_dict(),
            metrics=metrics,
            epoch=epoch,
            config={**self.cfg.to_dict(), "data": self.data, "arch_used": self.arch},
            model_name=self.cfg.model_name,
            arch_options=self.options,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            history=self.history,
            rng=rng_state(self.loader_gen),
        )

    def _write_config(self) -> None:
        resolved = {
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
        (self.out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    # -- epochs ---------------------------------------------------------------------------
    def _epoch_full(
        self, epoch: int
    ) -> tuple[EpochResult, EpochResult, torch.Tensor, torch.Tensor]:
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
        )
        if self.dist.is_main:
            va, preds, targets = evaluate(
                self.model,
                self.val_loader,
                self.val_criterion,
                self.precision,
                desc=f"epoch {epoch} val",
                max_batches=self.cfg.max_val_batches,
            )
        else:
            va, preds, targets = EpochResult(0.0, 0.0, 0), torch.empty(0), torch.empty(0)
        return tr, va, preds, targets

    def _epoch_cached(
        self, epoch: int, cache: FeatureCache
    ) -> tuple[EpochResult, EpochResult, torch.Tensor, torch.Tensor]:
        head = get_head(self.model, self.arch)
        head.train()
        feats = cache.train[(epoch - 1) % cache.views]
        order = torch.randperm(len(feats), generator=self.loader_gen)
        bs = self.cfg.batch_size
        n_batches = (len(order) + bs - 1) // bs
        if self.cfg.max_train_batches:
            n_batches = min(n_batches, self.cfg.max_train_batches)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(n_batches):
            idx = order[b * bs : (b + 1) * bs]
            x, y = feats[idx].to(self.device), cache.train_targets[idx].to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = head(x)
            loss = self.criterion(logits, y)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        head.eval()
        with torch.no_grad():
            val_logits = head(cache.val.to(self.device)).float().cpu()
        va = summarize(val_logits, cache.val_targets, self.val_criterion)
        return (
            EpochResult(loss_sum / max(seen, 1), correct / max(seen, 1), seen),
            va,
            val_logits.argmax(1),
            cache.val_targets,
        )

    def _features(self) -> FeatureCache:
        cfg = self.cfg
        views = cfg.feature_views
        if views > 0 and self.pre.augment != "none":
            train_views = [
                dataset_split(self.data, "train", self.pre.train_transform(), self.kind)
                for _ in range(views)
            ]
        else:
            train_views = [dataset_split(self.data, "train", self.pre.eval_transform(), self.kind)]
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
        say(
            f"cached frozen-backbone features: {cache.views} view(s) x {cache.train.shape[1]} "
            f"train + {len(cache.val)} val images, dim {cache.train.shape[-1]}, "
            f"{time.perf_counter() - t:.1f}s"
        )
        return cache

    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns the summary (also written to ``summary.json``)."""
        t0 = time.perf_counter()
        try:
            self._setup()
            return self._fit(t0)
        finally:
            cleanup(self.dist)

    def _fit(self, t0: float) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.info.fallback:
                banner(f"PRETRAINED=auto: {self.info.note}")
            say(
                f"model {cfg.model_name}: arch {self.arch} {self.options or ''}, mode {cfg.mode}, "
                f"{len(self.classes)} classes, weights: {self.info.source}\n"
                f"data {self.data} ({self.kind}): {len(self.train_ds)} train / "
                f"{len(self.val_ds)} val images; device {self.device}"
                f"{f' x{self.dist.world_size} processes' if self.dist.enabled else ''}"
                f"{f', amp {cfg.amp}' if cfg.amp != 'none' else ''}; out {self.out}"
            )
            self._write_config()
        writer = None
        if main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
        cache = self._features() if self.cached else None
        metrics_path = self.out / "metrics.jsonl"
        if main:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        last_cm: list[list[int]] | None = None
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            te = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            if cache is not None:
                tr, va, preds, targets = self._epoch_cached(epoch, cache)
            else:
                tr, va, preds, targets = self._epoch_full(epoch)
            self.scheduler.step()
            improved = False
            if main:
                row = {
                    "epoch": epoch,
                    "train_loss": tr.loss,
                    "train_acc": tr.acc,
                    "val_loss": va.loss,
                    "val_acc": va.acc,
                    "lr": lr,
                    "seconds": time.perf_counter() - te,
                }
                self.history.append(row)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                improved = _is_better(va.acc, va.loss, self.best)
                if improved:
                    self.best = dict(row)
                    last_cm = confusion_matrix(preds, targets, len(self.classes))
                assert self.best is not None
                metrics = {
                    "best_val_acc": self.best["val_acc"],
                    "best_val_loss": self.best["val_loss"],
                    "best_epoch": self.best["epoch"],
                    "val_images": va.samples,
                    "best": self.best,
                    "last": row,
                }
                if last_cm is not None and improved:
                    metrics["confusion"] = last_cm
                ckpt = self._checkpoint(epoch, metrics)
                save_checkpoint(ckpt, self.out / "last.pt")
                if improved:
                    save_checkpoint(ckpt, self.out / "checkpoint.pt")
                plot_curves(
                    self.history,
                    self.out / "curves.png",
                    title=f"{cfg.model_name} ({self.arch}, {cfg.mode})",
                )
                if writer is not None:
                    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                        writer.add_scalar(key, row[key], epoch)
                say(
                    f"epoch {epoch:3d}/{cfg.epochs}  lr {lr:.2e}  train loss {tr.loss:.4f} "
                    f"acc {tr.acc:.4f}  val loss {va.loss:.4f} acc {va.acc:.4f}  "
                    f"{row['seconds']:.1f}s{'  *best*' if improved else ''}"
                )
            barrier(self.dist)
        if writer is not None:
            writer.close()
        if not main:
            return {}
        if self.best is None:
            raise RuntimeError(
                f"nothing to train: start epoch {self.start_epoch} > epochs {cfg.epochs}"
            )
        if last_cm is not None:
            plot_confusion(
                last_cm,
                self.classes,
                self.out / "confusion.png",
                title=f"{cfg.model_name} val, epoch {self.best['epoch']}",
            )
        summary = {
            "model_name": cfg.model_name,
            "arch": self.arch,
            "mode": cfg.mode,
            "best_val_acc": self.best["val_acc"],
            "best_epoch": self.best["epoch"],
            "epochs": cfg.epochs,
            "seconds": time.perf_counter() - t0,
            "pretrained": self.info.to_dict(),
            "checkpoint": str(self.out / "checkpoint.pt"),
            "world_size": self.dist.world_size,
            "feature_cache": bool(self.cached),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.info.fallback:
            banner(
                f"NOTE: trained on the offline backbone {self.arch}, not {cfg.arch} "
                f"({self.info.note.split(':')[0]})"
            )
        say(
            f"done: best val acc {self.best['val_acc']:.4f} at epoch {self.best['epoch']} "
            f"({cfg.model_name}, {self.arch}, {cfg.mode}); {summary['seconds']:.1f}s total; "
            f"checkpoint {summary['checkpoint']}"
        )
        return summary
