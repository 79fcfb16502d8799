"""What a training run records about itself: its model card, its checkpoints and the
resolved configuration written to ``config.yaml``.

The card carries no machine-local paths (:data:`PATH_KEYS` are left out of the training
settings, other strings are redacted); the checkpoint holds everything a resume needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from serve.core.card import Metrics, ModelCard, Pretrained, Provenance, redact_paths
from train.checkpoint import Checkpoint, rng_state
from train.run_setup import RunSetup

PATH_KEYS = ("data", "out", "resume", "recipe")  # machine-local: not in the model card


class RunCard(RunSetup):
    """The model card, checkpoints and resolved config of a run, as of now."""

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
