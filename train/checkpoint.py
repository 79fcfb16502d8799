"""Self-describing checkpoints, written atomically and read without unpickling code.

A checkpoint is a plain dict (see :func:`make_checkpoint`) holding everything the
export stage needs: weights, architecture, class names, preprocessing (input size,
resize/crop, mean/std), pretrained source, metrics, epoch, optimizer state, config.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

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
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (tensors, strings, numbers, lists and dicts only)."""
    return {
        "format": FORMAT,
        "model_name": model_name,
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": dict(preprocess),
        "pretrained": dict(pretrained),
        "metrics": dict(metrics),
        "epoch": int(epoch),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": dict(config),
        "history": list(history or []),
        "torch_version": str(torch.__version__),
    }


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
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a {FORMAT} checkpoint (format={ckpt.get('format')!r})"
            if isinstance(ckpt, dict)
            else f"{path} is not a checkpoint dict"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the checkpoint's architecture and load its weights strictly (eval mode)."""
    from train.models import build_model

    model = build_model(ckpt["arch"], int(ckpt["num_classes"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit arch {ckpt['arch']!r}: {e}") from e
    return model.eval()
