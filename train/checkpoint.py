"""Self-describing checkpoints, written atomically and read without unpickling code.

A checkpoint is a plain dict (see :func:`make_checkpoint`) holding everything the
export stage needs - weights, architecture and its build options, class names,
preprocessing (input size, resize/crop, mean/std), pretrained source, metrics - and
everything ``--resume`` needs: epoch, optimizer, scheduler, RNG states, history.
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "trainserve.checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "num_classes", "classes", "state_dict", "preprocess")


def make_checkpoint(
    *,
    model: torch.nn.Module,
    arch: str,
    classes: list[str],
    preprocess: dict[str, Any],
    pretrained: dict[str, Any],
    metrics: dict[str, Any],
    epoch: int,
    config: dict[str, Any],
    model_name: str,
    arch_options: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    history: list[dict[str, Any]] | None = None,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (tensors, strings, numbers, lists and dicts only)."""
    return {
        "format": FORMAT,
        "model_name": model_name,
        "arch": arch,
        "arch_options": dict(arch_options or {}),
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": dict(preprocess),
        "pretrained": dict(pretrained),
        "metrics": dict(metrics),
        "epoch": int(epoch),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "config": dict(config),
        "history": list(history or []),
        "rng": rng,
        "torch_version": str(torch.__version__),
    }


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a resumed run needs, in weights_only-loadable form."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
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


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename over it.

    The temp file is created with the process umask (unlike mkstemp's 0600), so the
    result is readable by a server running as another user.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    atomic_write_bytes(Path(path), lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` and check it is one of ours, naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (run `make train` first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint dict")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (format={ckpt.get('format')!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the checkpoint's architecture and load its weights strictly (eval mode)."""
    from train.models import build_model

    model = build_model(ckpt["arch"], int(ckpt["num_classes"]), **ckpt.get("arch_options", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit arch {ckpt['arch']!r}: {e}") from e
    return model.eval()
