"""Self-describing checkpoints, written atomically and read without unpickling code.

A checkpoint holds the model card (``serve.core.card.ModelCard``: architecture and its
options, classes, input, eval preprocessing, provenance, metrics) - everything the export
stage needs - and everything ``--resume`` needs: weights, epoch, optimizer, scheduler,
scaler, RNG states, history. On disk it is a plain dict of tensors, strings, numbers,
lists and dicts (``torch.load(weights_only=True)``), written to a temp file and renamed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.backend.errors import UsageError
from serve.core import hints
from serve.core.card import ModelCard
from serve.core.card_reader import CardError
from serve.core.files import atomic_write

FORMAT = "trainserve.checkpoint/2"
LEGACY_FORMAT = "trainserve.checkpoint/1"


@dataclass
class Checkpoint:
    """One checkpoint: the card, the weights, and the training state to resume from."""

    card: ModelCard
    state_dict: dict[str, torch.Tensor]
    epoch: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # resolved TrainConfig (local)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the best epoch's metrics row
    augment: dict[str, Any] = field(default_factory=dict)  # training-only transform settings
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    # With weight EMA ``state_dict`` holds the EMA weights (what is evaluated and exported);
    # an exact resume also needs the live weights the optimizer steps and the EMA's count.
    train_weights: dict[str, torch.Tensor] | None = None
    ema_steps: int = 0
    torch_version: str = str(torch.__version__)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form (weights_only-loadable)."""
        return {
            "format": FORMAT,
            "card": self.card.to_dict(),
            "state_dict": self.state_dict,
            "epoch": int(self.epoch),
            "config": dict(self.config),
            "history": list(self.history),
            "best": self.best,
            "augment": dict(self.augment),
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "rng": self.rng,
            "train_weights": self.train_weights,
            "ema_steps": int(self.ema_steps),
            "torch_version": self.torch_version,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "checkpoint") -> Checkpoint:
        """Inverse of :meth:`to_dict`; also reads the previous format (cards built from
        its top-level keys). Raises ValueError naming what is missing or wrong."""
        fmt = d.get("format")
        if fmt == LEGACY_FORMAT:
            d = _from_legacy(d)
        elif fmt != FORMAT:
            raise UsageError(f"{where} is not a {FORMAT} checkpoint (format={fmt!r})")
        missing = [k for k in ("card", "state_dict") if k not in d]
        if missing:
            raise UsageError(f"{where} lacks {', '.join(missing)}")
        try:
            card = ModelCard.from_dict(d["card"])
        except CardError as e:
            raise UsageError(f"{where}: {e}") from e
        return cls(
            card=card,
            state_dict=d["state_dict"],
            epoch=int(d.get("epoch") or 0),
            config=dict(d.get("config") or {}),
            history=list(d.get("history") or []),
            best=d.get("best"),
            augment=dict(d.get("augment") or {}),
            optimizer=d.get("optimizer"),
            scheduler=d.get("scheduler"),
            scaler=d.get("scaler"),
            rng=d.get("rng"),
            train_weights=d.get("train_weights"),
            ema_steps=int(d.get("ema_steps") or 0),
            torch_version=str(d.get("torch_version", "")),
        )


def _from_legacy(d: dict[str, Any]) -> dict[str, Any]:
    """A ``trainserve.checkpoint/1`` dict (card fields at the top level) in the new shape."""
    missing = [k for k in ("arch", "classes", "preprocess", "state_dict") if k not in d]
    if missing:
        raise UsageError(f"legacy checkpoint lacks {', '.join(missing)}")
    pre, metrics = d["preprocess"], d.get("metrics") or {}
    card = ModelCard.create(
        name=d.get("model_name") or "model",
        arch=d["arch"],
        classes=list(d["classes"]),
        resize=int(pre["resize"]),
        crop=int(pre["crop"]),
        mean=list(pre["mean"]),
        std=list(pre["std"]),
        interpolation=pre.get("interpolation", "bilinear"),
        arch_options=dict(d.get("arch_options") or {}),
    )
    return {
        **d,
        "card": card.to_dict()
        | {
            "provenance": {"pretrained": d.get("pretrained") or {}},
            "metrics": {
                k: metrics.get(k)
                for k in ("best_val_acc", "best_val_loss", "best_epoch", "val_images")
            },
        },
        "best": metrics.get("best"),
        "augment": {k: pre[k] for k in ("augment", "padding") if k in pre},
    }


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a resumed run needs, in weights_only-loadable form."""
    numpy_state = np.random.get_state()  # the legacy tuple (legacy=True)
    assert isinstance(numpy_state, tuple)
    key, keys, pos, has_gauss, cached = numpy_state
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": key,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt: Checkpoint | dict[str, Any], path: str | Path) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    data = ckpt.to_dict() if isinstance(ckpt, Checkpoint) else ckpt
    atomic_write(Path(path), lambda f: torch.save(data, f))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load with ``weights_only=True`` and validate its card, naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        train = hints.command("train", "python -m train --out " + str(path.parent))
        raise FileNotFoundError(f"checkpoint {path} does not exist (run `{train}` first)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot load checkpoint {path}: {e}") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a checkpoint dict")
    return Checkpoint.from_dict(data, str(path))


def model_from_checkpoint(ckpt: Checkpoint) -> torch.nn.Module:
    """Rebuild the checkpoint's architecture and load its weights strictly (eval mode)."""
    from train.models.archs import build_model

    card = ckpt.card
    model = build_model(card.arch, card.num_classes, **card.arch_options)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        raise UsageError(f"checkpoint weights do not fit arch {card.arch!r}: {e}") from e
    return model.eval()


def checkpoint_from_model(
    model: torch.nn.Module,
    card: ModelCard,
    *,
    config: dict[str, Any] | None = None,
    epoch: int = 0,
) -> Checkpoint:
    """A checkpoint for weights trained elsewhere (no optimizer state: export only)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Checkpoint(card=card, state_dict=state, epoch=epoch, config=dict(config or {}))
