"""The parity bundle: everything one export's parity judged, in a folder that replays
anywhere (``runs/<model>/parity/``, kept with each published version in
``<version>/report/parity/``)::

    bundle.json             stages (reference, gate, thresholds, runtime, model file),
                            classes, versions, the commands that replay each stage
    inputs.npz              pixels (uint8 NCHW after resize + crop, exactly what every
                            stage saw), labels, image names
    images.npz              the encoded images the raw-image stage sent (when it ran)
    <stage>.npz             that stage's logits (and ``indices`` when it judged a sample)
    model*.onnx             the graphs the ONNX Runtime stages ran

Reading a bundle needs numpy only (:class:`Bundle`): replaying and localizing run
without torch, the checkpoint or the dataset. Written by the export through
:func:`write_bundle` into a staging folder renamed into place (never half a bundle).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.checks.parity import Gate, Stage, gate_from_record
from export.checks.stages import REFERENCE, StageName
from serve.backend.errors import UsageError
from serve.core.files import fsync_dir

log = logging.getLogger(__name__)

FORMAT = 1
BUNDLE_DIR = "parity"


@dataclass(frozen=True)
class StageRecord:
    """How one stage ran and how it was judged: enough to run it again."""

    name: str
    reference: str
    runtime: str  # pytorch | onnxruntime | tensorrt | triton-http | triton-grpc | triton-image
    model: str | None  # its model file in the bundle (ONNX Runtime stages)
    gate: str  # elementwise | accuracy
    thresholds: dict[str, Any]
    gating: bool
    status: str
    reason: str
    outputs: str | None  # <stage>.npz, None when it was skipped

    def gate_object(self) -> Gate:
        """The gate the export judged this stage with."""
        return gate_from_record(self.gate, self.thresholds)


@dataclass
class Bundle:
    """A bundle as read back (:meth:`load`)."""

    path: Path
    meta: dict[str, Any]
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read ``path`` (a bundle folder, or a run/report folder holding ``parity/``)."""
        path = Path(path)
        if not (path / "bundle.json").is_file() and (path / BUNDLE_DIR / "bundle.json").is_file():
            path = path / BUNDLE_DIR
        if not (path / "bundle.json").is_file():
            raise UsageError(
                f"{path} is not a parity bundle (no bundle.json); an export writes one to "
                f"runs/<model>/{BUNDLE_DIR}/ and keeps it in <version>/report/{BUNDLE_DIR}/"
            )
        meta = json.loads((path / "bundle.json").read_text())
        if meta.get("format") != FORMAT:
            raise UsageError(f"{path}: bundle format {meta.get('format')}, expected {FORMAT}")
        stages = {s["name"]: StageRecord(**s) for s in meta["stages"]}
        for r in stages.values():  # a bundle from elsewhere names files inside itself only
            for file in (r.model, r.outputs):
                if file and (Path(file).name != file or file.startswith(".")):
                    raise UsageError(f"{path}: stage {r.name} names {file!r}, not a file in it")
        return cls(path, meta, stages)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def stage(self, name: str) -> StageRecord:
        """The record of stage ``name``; an unknown name lists the ones there."""
        if name not in self.stages:
            ran = [s for s, r in self.stages.items() if r.outputs]
            raise UsageError(f"no stage {name!r} in {self.path}; stages: {', '.join(ran)}")
        return self.stages[name]

    def inputs(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Pixels as float32 0..255 NCHW (what the graphs take), labels, image names."""
        with np.load(self.path / "inputs.npz") as z:
            return z["pixels"].astype(np.float32), z["labels"], [str(n) for n in z["names"]]

    def images(self) -> list[bytes]:
        """The encoded images the raw-image stage sent."""
        if not (self.path / "images.npz").is_file():
            raise UsageError(f"{self.path} has no images.npz (the raw-image stage did not run)")
        with np.load(self.path / "images.npz") as z:
            data, offsets = z["data"], z["offsets"]
        return [data[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]

    def outputs(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Stage ``name``'s saved logits, and the image indices they are of (None: all)."""
        record = self.stage(name)
        if not record.outputs:
            raise UsageError(f"stage {name!r} did not run in this export: {record.reason}")
        with np.load(self.path / record.outputs) as z:
            indices = z["indices"] if "indices" in z.files else None
            return z["logits"], indices

    def model_path(self, name: str) -> Path | None:
        """The bundle's copy of the model stage ``name`` ran (None if it has none)."""
        model = self.stage(name).model
        return self.path / model if model else None


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the run folder's file is replaced by rename, never rewritten
    except OSError:
        shutil.copyfile(src, dst)


def exact_uint8(batches: list[np.ndarray]) -> np.ndarray:
    """The 0..255 float pixels as uint8, refusing any that would not round-trip exactly."""
    pixels = np.concatenate(batches)
    as_uint8 = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if not np.array_equal(as_uint8.astype(pixels.dtype), pixels):
        raise ValueError("parity pixels are not 8-bit values; the bundle stores them as uint8")
    return as_uint8


def write_bundle(
    target: Path,
    *,
    model: str,
    pixels: list[np.ndarray],
    labels: np.ndarray,
    names: list[str],
    classes: list[str],
    stages: list[Stage],
    logits: dict[str, np.ndarray],
    indices: dict[str, np.ndarray],
    models: dict[str, Path],
    images: list[bytes] | None,
    versions: dict[str, str],
    where: str = "",
    checkpoint: str = "",
) -> Path:
    """Write the bundle to ``target`` (replacing an older one there atomically).

    ``logits`` holds every stage that ran, the reference (``pytorch-fp32``) included;
    ``indices`` the images of the stages that judged a sample; ``models`` the file each
    ONNX Runtime stage ran (linked or copied in under its own name); ``where`` is how
    the replay commands name the bundle (``target`` by default), ``checkpoint`` the
    checkpoint the PyTorch stages' commands name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _save_npz(
            staging / "inputs.npz",
            pixels=exact_uint8(pixels),
            labels=np.asarray(labels, np.int64),
            names=np.asarray(names),
        )
        if images is not None:
            offsets = np.cumsum([0] + [len(b) for b in images], dtype=np.int64)
            data = np.frombuffer(b"".join(images), dtype=np.uint8)
            _save_npz(staging / "images.npz", data=data, offsets=offsets)
        copied: dict[Path, str] = {}
        records = [_reference_record(logits)]
        for s in stages:
            model_file = None
            if s.name in logits and s.name in models and models[s.name].is_file():
                src = models[s.name].resolve()
                if src not in copied:
                    copied[src] = src.name
                    _link_or_copy(src, staging / src.name)
                model_file = copied[src]
            records.append(
                StageRecord(
                    name=s.name,
                    reference=s.reference,
                    runtime=StageName(s.name).runtime,
                    model=model_file,
                    gate=s.gate,
                    thresholds=dict(s.thresholds),
                    gating=s.gating,
                    status=s.status,
                    reason=s.reason,
                    outputs=f"{s.name}.npz" if s.name in logits else None,
                )
            )
        for name, out in logits.items():
            extra = {"indices": indices[name]} if name in indices else {}
            _save_npz(staging / f"{name}.npz", logits=np.asarray(out, np.float32), **extra)
        meta = {
            "format": FORMAT,
            "model": model,
            "classes": classes,
            "images": len(names),
            "input_shape": list(np.concatenate(pixels).shape[1:]) if pixels else [],
            "versions": versions,
            "stages": [asdict(r) for r in records],
            "replay": {
                r.name: replay_command(r, where or str(target), checkpoint)
                for r in records
                if r.name != REFERENCE and r.outputs
            },
        }
        (staging / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in staging.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(staging, 0o755)
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _reference_record(logits: dict[str, np.ndarray]) -> StageRecord:
    return StageRecord(
        name=REFERENCE,
        reference="",
        runtime="pytorch",
        model=None,
        gate="",
        thresholds={},
        gating=False,
        status="reference",
        reason="the checkpoint in PyTorch FP32: every stage is judged against it",
        outputs=f"{REFERENCE}.npz" if REFERENCE in logits else None,
    )


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an older ``target`` goes aside first and is
    removed after (a reader sees the old bundle or the new one)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.rename(target, old)
    os.rename(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replay_command(record: StageRecord, bundle: str, checkpoint: str = "") -> str:
    """The command that replays ``record``'s stage (parity.md lists one per stage)."""
    base = f"python -m export replay {bundle} --stage {record.name}"
    if record.runtime.startswith("triton"):
        return f"{base} --url localhost:{8001 if record.runtime != 'triton-http' else 8000}"
    if record.runtime == "tensorrt":
        return f"{base} --engine model.plan"
    if record.runtime == "pytorch":
        return f"{base} --checkpoint {checkpoint or 'CHECKPOINT'}"
    return base


def copy_bundle(src: Path, dst: Path) -> None:
    """A published version's own copy of the bundle (files linked where possible)."""
    if not (src / "bundle.json").is_file():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        for f in src.iterdir():
            _link_or_copy(f, staging / f.name)
        os.chmod(staging, 0o755)
        _swap_into_place(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
