"""Add this GPU's TensorRT plan to a published ``tensorrt_plan`` version.

``python -m export trt --model-repository REPO --name NAME [--version N] --data DIR``:

1. build a strongly typed engine from the version's ``model.onnx`` for the local GPU
   (Polygraphy; the graph the export's plans were built from - FP16 or INT8 Q/DQ - so
   the precision is the same; the version's batch profile unless given, optional
   version/hardware compatibility);
2. engine parity on this GPU: TensorRT vs ONNX Runtime (CPU, the same graph) on real
   val images,
   decoded and resized by the served preprocessing (serve/backend/preprocess.py), judged with
   the FP16 thresholds (top-1 agreement and median difference); a failure refuses the
   plan (exit 3) and changes nothing;
3. under the model's publish lock: ``model.sm<cc>.plan`` (or ``model.plan`` for a
   hardware-compatible engine) and its ``.json`` (build metadata + the parity result)
   into the version, the card's file hashes, and the config's ``cc_model_filenames``
   re-derived from every version's plans.

Runs only where TensorRT and a CUDA GPU are present; elsewhere it stops before reading
anything, naming what is missing.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.checks.parity import Thresholds, judge
from export.checks.stages import PixelBatches, StageName
from export.formats.tensorrt_engine import (
    EngineProfile,
    build_engine,
    metadata_path,
    plan_filename,
    repository_plans,
    require_tensorrt,
)
from export.runners.onnxruntime import OnnxRuntimeRunner
from export.runners.tensorrt import TensorRTRunner
from export.triton.config import set_plans, target_of
from serve.backend.errors import UsageError
from serve.backend.preprocess import IMAGE_EXTENSIONS, ResizeCrop, preprocess
from serve.core.card import ModelCard
from serve.core.errors import GateRefused
from serve.core.files import atomic_write_text, copy_into, locked, sha256, versions
from serve.core.model_config import config_text, parse_config
from serve.core.names import INPUT_NAME

log = logging.getLogger(__name__)


class EngineParityFailed(GateRefused):
    """The new engine disagrees with ONNX Runtime FP32 on this GPU (exit 3)."""


@dataclass
class AddPlan:
    """Inputs of one ``export trt`` run against a published version."""

    repository: str
    name: str
    data: str  # ImageFolder root whose ``split`` holds the val images
    version: int = 0  # 0: the latest
    split: str = "val"
    limit: int = 256  # images for the engine parity (0: all)
    tolerance: float = 1e-2  # median |diff|, absolute or relative (FP16 engine)
    min_top1: float = 0.995
    profile: EngineProfile = field(default_factory=EngineProfile)  # max: the config's
    timing_cache: str = ""


def val_pixels(card: ModelCard, data: str | Path, split: str, limit: int) -> np.ndarray:
    """Val images of an ImageFolder, as the served preprocessing turns them into pixels."""
    root = Path(data) / split
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images under {root} (give --data, an ImageFolder root)")
    if 0 < limit < len(files):
        files = files[:: max(1, len(files) // limit)][:limit]  # spread over the classes
    p = card.preprocessing
    geometry = ResizeCrop(p.resize, p.crop, p.interpolation)
    return np.stack([preprocess(f, geometry) for f in files])


def _version_dir(model_dir: Path, version: int) -> Path:
    found = versions(model_dir)
    if not found:
        raise FileNotFoundError(f"{model_dir} has no published version")
    chosen = version or found[-1]
    if chosen not in found:
        raise FileNotFoundError(f"{model_dir} has no version {chosen} (has {found})")
    return model_dir / str(chosen)


def add_plan(job: AddPlan) -> dict[str, Any]:
    """Build, check and add this GPU's plan to the version; returns what was done."""
    require_tensorrt()  # the blocker first, before reading anything
    model_dir = Path(job.repository) / job.name
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    if target_of(cfg) != "gpu-tensorrt":
        raise UsageError(f"{model_dir} serves {target_of(cfg)} versions, not tensorrt_plan ones")
    version_dir = _version_dir(model_dir, job.version)
    onnx_path = version_dir / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(
            f"{onnx_path} is missing: this version was published without the ONNX its "
            "plans are built from; export it again to get a version that can gain plans"
        )
    card = ModelCard.read(version_dir / "model_card.json")
    # The plan's batch range must cover the config's max_batch_size, whatever the flags say.
    top = cfg.max_batch_size
    profile = replace(
        job.profile, min_batch=1, opt_batch=min(job.profile.opt_batch, top), max_batch=top
    )
    pixels = PixelBatches.of(val_pixels(card, job.data, job.split, job.limit), profile.max_batch)
    reference = OnnxRuntimeRunner(onnx_path).logits(pixels)
    with tempfile.TemporaryDirectory(prefix="trt-plan-") as tmp:
        built = Path(tmp) / "model.plan"
        meta = build_engine(
            onnx_path, built, profile, INPUT_NAME, card.input.shape, job.timing_cache or None
        )
        # strongly typed: the plan computes in the version's model.onnx types
        stage_name = StageName(f"tensorrt-{meta['precision']}")
        logits = TensorRTRunner(built, stage_name).logits(pixels)
        gate = Thresholds(
            min_top1=job.min_top1, stat="median", atol=job.tolerance, rtol=job.tolerance
        )
        stage = judge(stage_name, "onnxruntime", reference, logits, gate, True)
        if stage.status == "failed":
            raise EngineParityFailed(
                f"the engine built on {meta['gpu_name']} disagrees with ONNX Runtime FP32 "
                f"({stage.reason}); nothing was added to {version_dir}"
            )
        meta["parity"] = stage.to_dict()
        meta["onnx"] = "model.onnx"  # the version's own file, no machine-local path
        plan = plan_filename(meta)
        with locked(model_dir, what="publisher of this model"):
            copy_into(built, version_dir / f".{plan}.tmp")
            (version_dir / f".{plan}.tmp").replace(version_dir / plan)
            atomic_write_text(metadata_path(version_dir / plan), json.dumps(meta, indent=2) + "\n")
            files = {**card.files, plan: sha256(version_dir / plan)}
            files[f"{plan}.json"] = sha256(metadata_path(version_dir / plan))
            card = replace(card, files=dict(sorted(files.items())))
            card_text = json.dumps(card.to_dict(), indent=2) + "\n"
            atomic_write_text(version_dir / "model_card.json", card_text)
            cfg = parse_config((model_dir / "config.pbtxt").read_text())
            set_plans(cfg, repository_plans(model_dir))
            atomic_write_text(model_dir / "config.pbtxt", config_text(cfg))
    log.info("added %s to %s (%s, parity %s)", plan, version_dir, meta["gpu_name"], stage.status)
    return {"plan": str(version_dir / plan), "metadata": meta}
