"""What a training run records about itself: its model card (:func:`model_card`), its
checkpoints (:func:`run_checkpoint`) and the resolved configuration written to
``config.yaml`` (:func:`resolved_config`).

The card carries no machine-local paths (:data:`PATH_KEYS` are left out of the training
settings, other strings are redacted); the checkpoint holds everything a resume needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from serve.core.card import Metrics, ModelCard, Pretrained, Provenance, redact_paths
from train.models.checkpoint import Checkpoint, rng_state
from train.run.state import RunState

PATH_KEYS = ("data", "out", "resume", "recipe")  # machine-local: not in the model card


def model_card(state: RunState, metrics: Metrics) -> ModelCard:
    """The run's model card as of now (export completes it)."""
    cfg, info = state.cfg, state.info
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
        dataset=Path(state.job.data).name,
        training=settings,
        torch_version=str(torch.__version__),
    )
    pre = state.pre.card_preprocessing()
    return ModelCard.create(
        name=cfg.model_name,
        arch=state.arch,
        classes=state.classes,
        resize=pre.resize,
        crop=pre.crop,
        mean=pre.mean,
        std=pre.std,
        interpolation=pre.interpolation,
        arch_options=state.options,
        provenance=provenance,
        metrics=metrics,
    )


def run_checkpoint(state: RunState, epoch: int, metrics: Metrics) -> Checkpoint:
    """The checkpoint of the run as of ``epoch``: the card, the weights evaluated (the
    EMA's with ``ema_decay``) and everything an exact resume needs."""
    return Checkpoint(
        card=model_card(state, metrics),
        state_dict={k: v.detach().cpu().clone() for k, v in state.eval_model.state_dict().items()},
        epoch=epoch,
        config={**state.cfg.to_dict(), "data": state.job.data, "arch_used": state.arch},
        history=list(state.history),
        best=dict(state.best) if state.best else None,
        augment=state.pre.augment_settings(),
        optimizer=state.optimizer.state_dict(),
        scheduler=state.scheduler.state_dict(),
        scaler=state.scaler.state_dict() if state.scaler.is_enabled() else None,
        rng=rng_state(state.loader_gen),
        train_weights=(
            {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
            if state.ema is not None
            else None
        ),
        ema_steps=int(state.ema.n_averaged) if state.ema is not None else 0,
    )


def resolved_config(state: RunState) -> dict[str, Any]:
    """The settings as run (``config.yaml``): the config and what was resolved."""
    return {
        **state.cfg.to_dict(),
        "data": state.job.data,
        "dataset_kind": state.job.kind,
        "arch_used": state.arch,
        "arch_options": state.options,
        "pretrained_info": state.info.to_dict(),
        "preprocess": state.pre.to_dict(),
        "classes": state.classes,
        "world_size": state.job.dist.world_size,
        "device": str(state.job.device),
    }
