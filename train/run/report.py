"""A training run's history and what it reports: the metrics row of each epoch, the best
epoch so far, the per-epoch checkpoints and log lines (:func:`record_epoch`), TensorBoard
scalars, the opening announcement (:func:`announce`) and the closing summary
(:func:`finish`). Only the main process reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sized
from typing import Any, cast

import torch

from serve.core.card import Metrics
from train.config import TrainConfig
from train.run._card import run_checkpoint
from train.run._epochs import EpochOutcome
from train.run.outputs import RunOutputs, banner
from train.run.state import RunState

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


def run_title(cfg: TrainConfig, arch: str) -> str:
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


def run_stages(cfg: TrainConfig) -> list[tuple[int, str]]:
    """The stages of a run by first epoch (LP-FT: the probe is epoch 0), for the curves."""
    if cfg.mode == "finetune" and cfg.lp_epochs > 0 and cfg.epochs > 0 and cfg.pretrained != "none":
        return [(0, "linear probe"), (1, "fine-tune")]
    return []


def announce(state: RunState) -> None:
    """The run's opening lines: what trains on what, where (and the fallback banner)."""
    cfg, job = state.cfg, state.job
    if state.info.fallback:
        banner(f"PRETRAINED=auto: {state.info.note}")
    procs = f" x{job.dist.world_size} processes" if job.dist.enabled else ""
    amp = f", amp {cfg.amp}" if cfg.amp != "none" else ""
    log.info(
        "model %s: arch %s %s, mode %s, %d classes, weights: %s\n"
        "data %s (%s): %d train / %d val images; device %s%s%s; out %s",
        cfg.model_name,
        state.arch,
        state.options or "",
        cfg.mode,
        len(state.classes),
        state.info.source,
        job.data,
        job.kind,
        len(cast(Sized, state.train_ds)),
        len(cast(Sized, state.val_ds)),
        job.device,
        procs,
        amp,
        job.out,
    )


def open_tensorboard(state: RunState) -> Any:
    """A TensorBoard writer into ``OUT/tensorboard`` with ``--tensorboard``, else None."""
    if not state.cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(state.job.out / "tensorboard"))


def record_epoch(
    state: RunState,
    outputs: RunOutputs,
    epoch: int,
    lr: float,
    te: float,
    r: EpochOutcome,
    writer: Any,
) -> list[list[int]] | None:
    """Metrics row, checkpoints, curves and the log line of one epoch (main process).
    Returns the confusion matrix when this epoch is the new best."""
    row = epoch_row(epoch, lr, te, r)
    state.history.append(row)
    improved = is_better(r.val.acc, r.val.loss, state.best)
    confusion = None
    if improved:
        state.best = dict(row)
        confusion = confusion_matrix(r.preds, r.targets, len(state.classes))
    assert state.best is not None
    metrics = Metrics(
        best_val_acc=state.best["val_acc"],
        best_val_loss=state.best["val_loss"],
        best_epoch=state.best["epoch"],
        val_images=r.val.samples,
        confusion=confusion,
    )
    title = run_title(state.cfg, state.arch)
    outputs.epoch(
        row, run_checkpoint(state, epoch, metrics), improved, title, run_stages(state.cfg)
    )
    if writer is not None:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            writer.add_scalar(key, row[key], epoch)
    _log_epoch(state.cfg.epochs, row, r, improved)
    return confusion


def _log_epoch(epochs: int, row: dict[str, Any], r: EpochOutcome, improved: bool) -> None:
    log.info(
        "epoch %3d/%d  lr %.2e  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  %.1fs%s",
        row["epoch"],
        epochs,
        row["lr"],
        r.train.loss,
        100 * r.train.acc,
        r.val.loss,
        100 * r.val.acc,
        row["seconds"],
        "  *best*" if improved else "",
    )


def finish(
    state: RunState, outputs: RunOutputs, t0: float, confusion: list[list[int]] | None
) -> dict[str, Any]:
    """Writes the run's end (``summary.json``, the best epoch's confusion matrix) and
    logs it; returns the summary."""
    cfg, best = state.cfg, state.best
    assert best is not None
    summary = run_summary(state, t0, best)
    outputs.finish(
        summary, confusion, state.classes, f"{cfg.model_name} val, epoch {best['epoch']}"
    )
    if state.info.fallback:
        banner(
            f"NOTE: trained on the offline backbone {state.arch}, not {cfg.arch} "
            f"({state.info.note.split(':')[0]})"
        )
    log.info(
        "done: best val acc %.2f%% at epoch %d (%s, %s, %s); %.1fs total; checkpoint %s",
        100 * best["val_acc"],
        best["epoch"],
        cfg.model_name,
        state.arch,
        cfg.mode,
        summary["seconds"],
        summary["checkpoint"],
    )
    return summary


def run_summary(state: RunState, t0: float, best: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``: the run's best epoch, its time and where its checkpoint is."""
    cfg, job = state.cfg, state.job
    return {
        "model_name": cfg.model_name,
        "arch": state.arch,
        "mode": cfg.mode,
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "epochs": cfg.epochs,
        "seconds": time.perf_counter() - t0,
        "pretrained": state.info.to_dict(),
        "checkpoint": str(job.out / "checkpoint.pt"),
        "world_size": job.dist.world_size,
        "feature_cache": bool(job.cached),
        "lp_val_acc": state.lp_val_acc,
    }
