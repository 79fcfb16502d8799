"""The training run: data, model, optimizer, epochs, checkpoints, metrics and curves."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets.folder import find_classes

from train.checkpoint import make_checkpoint, save_checkpoint
from train.config import TrainConfig
from train.data import Preprocess, build_datasets, check_image_folder
from train.engine import evaluate, train_one_epoch
from train.models import get_arch, get_head
from train.plots import plot_curves
from train.pretrained import PretrainedInfo, resolve_pretrained


def say(msg: str) -> None:
    """Progress/status line on stderr (stdout stays clean for results)."""
    print(msg, file=sys.stderr, flush=True)


def banner(msg: str) -> None:
    """A message nobody can miss."""
    line = "!" * 78
    say(f"\n{line}\n!! {msg}\n{line}\n")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for DataLoader shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


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
        self.root = Path(cfg.data)

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.generator = seed_everything(cfg.seed)
        self.classes, _ = find_classes(str(check_image_folder(self.root, "train")))
        model, info = resolve_pretrained(
            cfg.arch, cfg.pretrained, len(self.classes), timeout=cfg.download_timeout
        )
        self.model: nn.Module = model
        self.info: PretrainedInfo = info
        self.arch = info.arch
        spec = get_arch(self.arch)
        self.pre = Preprocess(
            resize=cfg.resize,
            crop=cfg.crop,
            mean=info.mean or spec.mean,
            std=info.std or spec.std,
        )
        train_ds, val_ds = build_datasets(self.root, self.pre)
        self.train_loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            num_workers=cfg.workers,
            generator=self.generator,
            drop_last=False,
        )
        self.val_loader = DataLoader(
            val_ds, batch_size=max(cfg.batch_size, 32), shuffle=False, num_workers=cfg.workers
        )
        self.feature_extract = cfg.mode == "feature-extract"
        head = get_head(self.model, self.arch)
        if self.feature_extract:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in head.parameters():
                p.requires_grad_(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=cfg.step_size, gamma=cfg.gamma
        )
        self.criterion = nn.CrossEntropyLoss()

    def _set_train_mode(self, training: bool) -> None:
        """Fine-tune: everything trains. Feature-extract: the frozen backbone stays in
        eval mode (BatchNorm statistics fixed), only the head trains."""
        self.model.train(training and not self.feature_extract)
        get_head(self.model, self.arch).train(training)

    def _checkpoint(self, epoch: int, metrics: dict[str, Any], history: list) -> dict[str, Any]:
        return make_checkpoint(
            model=self.model,
            arch=self.arch,
            classes=self.classes,
            preprocess=self.pre.to_dict(),
            pretrained=self.info.to_dict(),
            metrics=metrics,
            epoch=epoch,
            config={**self.cfg.to_dict(), "arch_used": self.arch},
            model_name=self.cfg.model_name,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            history=history,
        )

    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns the summary (also written to ``summary.json``)."""
        t0 = time.perf_counter()
        self._setup()
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.info.fallback:
            banner(f"PRETRAINED=auto: {self.info.note}")
        say(
            f"model {cfg.model_name}: arch {self.arch}, mode {cfg.mode}, classes {self.classes}, "
            f"weights: {self.info.source}\n"
            f"data {self.root}: {len(self.train_loader.dataset)} train / "
            f"{len(self.val_loader.dataset)} val images; out {self.out}"
        )
        (self.out / "config.json").write_text(
            json.dumps(
                {
                    **cfg.to_dict(),
                    "arch_used": self.arch,
                    "pretrained_info": self.info.to_dict(),
                    "preprocess": self.pre.to_dict(),
                    "classes": self.classes,
                },
                indent=2,
            )
            + "\n"
        )
        metrics_path = self.out / "metrics.jsonl"
        metrics_path.write_text("")
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        for epoch in range(1, cfg.epochs + 1):
            te = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            tr = train_one_epoch(
                self.model,
                self.train_loader,
                self.criterion,
                self.optimizer,
                desc=f"epoch {epoch}/{cfg.epochs} train",
                max_batches=cfg.max_train_batches,
                set_train_mode=self._set_train_mode,
            )
            va, _, _ = evaluate(
                self.model,
                self.val_loader,
                self.criterion,
                desc=f"epoch {epoch}/{cfg.epochs} val",
                max_batches=cfg.max_val_batches,
            )
            self.scheduler.step()
            row = {
                "epoch": epoch,
                "train_loss": tr.loss,
                "train_acc": tr.acc,
                "val_loss": va.loss,
                "val_acc": va.acc,
                "lr": lr,
                "seconds": time.perf_counter() - te,
            }
            history.append(row)
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            improved = _is_better(va.acc, va.loss, best)
            if improved:
                best = dict(row)
            metrics = {
                "best_val_acc": best["val_acc"],
                "best_val_loss": best["val_loss"],
                "best_epoch": best["epoch"],
                "val_images": va.samples,
                "last": row,
            }
            ckpt = self._checkpoint(epoch, metrics, history)
            save_checkpoint(ckpt, self.out / "last.pt")
            if improved:
                save_checkpoint(ckpt, self.out / "checkpoint.pt")
            plot_curves(
                history,
                self.out / "curves.png",
                title=f"{cfg.model_name} ({self.arch}, {cfg.mode})",
            )
            say(
                f"epoch {epoch:3d}/{cfg.epochs}  lr {lr:.2e}  train loss {tr.loss:.4f} "
                f"acc {tr.acc:.4f}  val loss {va.loss:.4f} acc {va.acc:.4f}  "
                f"{row['seconds']:.1f}s{'  *best*' if improved else ''}"
            )
        assert best is not None
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
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.info.fallback:
            banner(
                f"NOTE: trained on the offline backbone {self.arch}, not resnet18 "
                f"({self.info.note.split(':')[0]})"
            )
        say(
            f"done: best val acc {best['val_acc']:.4f} at epoch {best['epoch']} "
            f"({cfg.model_name}, {self.arch}, {cfg.mode}); {summary['seconds']:.1f}s total; "
            f"checkpoint {summary['checkpoint']}"
        )
        return summary
