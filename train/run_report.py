"""A training run's history and what it reports: the metrics row of each epoch, the best
epoch so far, the per-epoch checkpoints and log lines, TensorBoard scalars, the opening
announcement and the closing summary. Only the main process reports.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from serve.core.card import Metrics
from train.run_card import RunCard
from train.run_epochs import EpochOutcome
from train.run_outputs import banner

log = logging.getLogger(__name__)


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


def epoch_row(epoch: int, lr: float, te: float, r: EpochOutcome) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of an epoch that started at ``time.perf_counter() == te``."""
    return {
        "epoch": epoch,
        "train_loss": r.train.loss,
        "train_acc": r.train.acc,
        "val_loss": r.val.loss,
        "val_acc": r.val.acc,
        "lr": lr,
        "seconds": time.perf_counter() - te,
    }


def run_title(cfg: Any, arch: str) -> str:
    """What the run is, in words: ``antsbees: efficientnet_lite0, linear probe + fine-tune
    (pretrained auto)``, ``cifar10_resnet20: resnet20 from scratch``."""
    if cfg.pretrained == "none":
        how = "from scratch"
    elif cfg.mode == "feature_extract":
        how = "feature extraction (frozen backbone)"
    elif cfg.lp_epochs > 0 and cfg.epochs == 0:
        how = "linear probe (frozen backbone)"
    elif cfg.lp_epochs > 0:
        how = "linear probe + fine-tune"
    else:
        how = "fine-tune"
    weights = "" if cfg.pretrained == "none" else f" (weights: {cfg.pretrained})"
    return f"{cfg.model_name}: {arch}, {how}{weights}"


def run_stages(cfg: Any) -> list[tuple[int, str]]:
    """The stages of a run by first epoch (LP-FT: the probe is epoch 0), for the curves."""
    if cfg.mode == "finetune" and cfg.lp_epochs > 0 and cfg.epochs > 0 and cfg.pretrained != "none":
        return [(0, "linear probe"), (1, "fine-tune")]
    return []


class RunReport(RunCard):
    """Records each epoch (history, best, checkpoints, curves, log line) and reports the
    run's start and end."""

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
        row = epoch_row(epoch, lr, te, r)
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
        title = run_title(self.cfg, self.arch)
        self.outputs.epoch(
            row, self._checkpoint(epoch, metrics), improved, title, run_stages(self.cfg)
        )
        if writer is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                writer.add_scalar(key, row[key], epoch)
        self._log_epoch(row, r, improved)
        return confusion

    def _log_epoch(self, row: dict[str, Any], r: EpochOutcome, improved: bool) -> None:
        log.info(
            "epoch %3d/%d  lr %.2e  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  %.1fs%s",
            row["epoch"],
            self.cfg.epochs,
            row["lr"],
            r.train.loss,
            100 * r.train.acc,
            r.val.loss,
            100 * r.val.acc,
            row["seconds"],
            "  *best*" if improved else "",
        )

    def _summarize(self, t0: float, confusion: list[list[int]] | None) -> dict[str, Any]:
        """Writes the run's end (``summary.json``, the best epoch's confusion matrix) and
        logs it; returns the summary."""
        cfg, best = self.cfg, self.best
        assert best is not None and self.outputs is not None
        summary = self._summary(t0, best)
        self.outputs.finish(
            summary, confusion, self.classes, f"{cfg.model_name} val, epoch {best['epoch']}"
        )
        if self.info.fallback:
            banner(
                f"NOTE: trained on the offline backbone {self.arch}, not {cfg.arch} "
                f"({self.info.note.split(':')[0]})"
            )
        log.info(
            "done: best val acc %.2f%% at epoch %d (%s, %s, %s); %.1fs total; checkpoint %s",
            100 * best["val_acc"],
            best["epoch"],
            cfg.model_name,
            self.arch,
            cfg.mode,
            summary["seconds"],
            summary["checkpoint"],
        )
        return summary

    def _summary(self, t0: float, best: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return {
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
