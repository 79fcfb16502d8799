"""Content-addressed cache of exported ONNX graphs.

``torch.onnx.export(dynamo=True)`` takes 20-30 s per ImageNet-size model on a 2-core CPU,
and a checkpoint is often exported again unchanged: after a refused gate, with
``--force``, into another repository, for the GPU target after the CPU one. The graph
depends only on the checkpoint file, the opset and the exporting software, so it is kept
under a key made of exactly those (checkpoint sha256, opset, torch and onnx versions,
:data:`EXPORTER_VERSION`). The model card metadata is re-attached on every export, and
every export still runs its full parity check against PyTorch, so a wrong entry cannot
be published silently.

Where: ``--onnx-cache DIR``, else ``$TRAINSERVE_ONNX_CACHE``, else
``~/.cache/trainserve/onnx``; ``off`` (flag or variable) disables it. The newest
:data:`KEEP` entries are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from serve.core.files import atomic_write_bytes

log = logging.getLogger(__name__)

ENV = "TRAINSERVE_ONNX_CACHE"
OFF = ("off", "none", "0")
KEEP = 16
# Bump when export_onnx changes the graph it writes for the same checkpoint.
EXPORTER_VERSION = 1


def cache_key(checkpoint_sha256: str, opset: int) -> str:
    """The key of one export: what the graph depends on, hashed."""
    parts = {
        "checkpoint_sha256": checkpoint_sha256,
        "opset": opset,
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "exporter": EXPORTER_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class OnnxCache:
    """A folder of ``<key>.onnx`` files (graphs without the card metadata)."""

    root: Path
    keep: int = KEEP

    @classmethod
    def resolve(cls, flag: str = "") -> OnnxCache | None:
        """The cache a flag value or ``$TRAINSERVE_ONNX_CACHE`` names (``off``: none)."""
        where = flag or os.environ.get(ENV, "")
        if where.lower() in OFF:
            return None
        return cls(Path(where) if where else Path.home() / ".cache" / "trainserve" / "onnx")

    def path(self, key: str) -> Path:
        return self.root / f"{key}.onnx"

    def get(self, key: str) -> onnx.ModelProto | None:
        """The cached graph, or None (missing or unreadable entries are misses)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            proto = onnx.load_from_string(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - a broken entry is a miss, and is replaced
            log.warning("ONNX cache entry %s unreadable (%s): exporting again", path, e)
            return None
        os.utime(path)  # most recently used
        return proto

    def put(self, key: str, proto: onnx.ModelProto) -> None:
        """Store a graph (atomically) and prune the oldest entries beyond ``keep``.
        A cache that cannot be written is logged, never an export failure."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path(key), proto.SerializeToString())
            entries = sorted(self.root.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
            for old in entries[: max(0, len(entries) - self.keep)]:
                old.unlink(missing_ok=True)
        except OSError as e:
            log.warning("ONNX cache %s not written: %s", self.root, e)
