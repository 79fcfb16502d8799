"""Publish an exported model into a Triton model repository as the next numeric version.

Layout::

    <repo>/<name>/config.pbtxt         model-level config (export/triton/config.py)
    <repo>/<name>/labels.txt           one class name per line (label_filename)
    <repo>/<name>/<N>/model_card.json  everything known about version N (serve/core/card.py)
    <repo>/<name>/<N>/...              the target's files:

* ``cpu``: ``model.onnx`` (FP32, or the INT8/FP16 model when that precision was
  published) + the python backend's files (``model.py`` and its siblings: the package
  serve/backend copied whole), running ONNX Runtime on CPU;
* ``gpu`` + ``tensorrt``: ``model.sm<cc>.plan`` per compute capability (or ``model.plan``
  when hardware-compatible), each with its ``.json``, listed in ``cc_model_filenames``,
  and the ``model.onnx`` they were built from - FP16, or INT8 Q/DQ: the plans are strongly
  typed, their precision is this graph's (``python -m export trt`` adds the plan of
  another GPU to the version from it);
* ``gpu`` + ``onnxruntime``: ``model.onnx`` with the TensorRT execution accelerator.

Beside it ``<name>_preprocess`` (next version: serve/backend copied whole, its
``model.py`` runs the preprocess model) and the ``<name>_image`` ensemble.
``<repo>/<name>/warmup/`` and ``<repo>/<name>_preprocess/warmup/`` hold the warmup
inputs (real val images, export/triton/warmup.py) the configs' ``model_warmup`` entries name.

Every version is assembled in a hidden staging folder and renamed into place, so Triton
never sees half a version. Publishers of one model take a lock on its folder and run one
after the other; the config and labels are written only once the version exists. A
version that would change what the existing versions share - the signature (inputs,
outputs, labels), the target, or the preprocessing (resize, crop, interpolation,
normalization) - is refused: all versions share one config and one preprocess model.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import serve.backend
from export.formats.tensorrt_engine import metadata_path, plan_filename, repository_plans
from export.triton.config import (
    BACKEND_NAMES,
    ServingConfig,
    add_warmup,
    classifier_config,
    ensemble_config,
    geometry,
    preprocess_config,
    set_plans,
    signature,
    target_of,
)
from export.triton.warmup import build_warmup
from serve.backend.errors import UsageError, UserError
from serve.core.card import ModelCard
from serve.core.files import (
    atomic_write_text,
    copy_into,
    locked,
    publish_dir,
    sha256,
    staged_dir,
    versions,
)
from serve.core.model_config import config_text, parse_config
from serve.core.names import image_model_name, preprocess_model_name

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Incompatible(UserError, ValueError):
    """The new version cannot join the model's existing versions."""


@dataclass
class Published:
    """Where one export went."""

    classifier: Path  # <repo>/<name>/<N>
    preprocess: Path  # <repo>/<name>_preprocess/<M>
    ensemble: Path  # <repo>/<name>_image
    card: ModelCard


def check_model_name(name: str) -> str:
    """Model names become directory names and URL parts: keep them plain."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"bad model name {name!r}: use letters, digits, '_', '-', '.' "
            "(at most 64, not starting with a symbol)"
        )
    return name


def sanitize_label(label: str) -> str:
    """Labels go one per line into labels.txt: no line breaks or control characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(label)).strip()
    if not clean:
        raise UsageError(f"class name {label!r} is empty after removing control characters")
    return clean


def _latest_card(model_dir: Path) -> ModelCard | None:
    found = versions(model_dir)
    path = model_dir / str(found[-1]) / "model_card.json" if found else None
    if path is None or not path.is_file():
        return None
    return ModelCard.read(path)


def check_compatible(model_dir: Path, cfg, labels: list[str], card: ModelCard) -> None:
    """Refuse a version that changes what the model's versions share (see the module
    docstring), naming what changed."""
    cfg_path, labels_path = model_dir / "config.pbtxt", model_dir / "labels.txt"
    if not cfg_path.is_file() or not versions(model_dir):
        return
    old = parse_config(cfg_path.read_text())
    old_labels = labels_path.read_text().splitlines() if labels_path.is_file() else []
    if signature(old) != signature(cfg) or old_labels != labels:
        raise Incompatible(
            f"{model_dir.name}: the new version changes what clients see "
            f"(inputs/outputs {signature(old)} -> {signature(cfg)}; labels {old_labels} -> "
            f"{labels}); publish it under another model name"
        )
    if target_of(old) != target_of(cfg):
        raise Incompatible(
            f"{model_dir.name} in {model_dir.parent} holds {target_of(old)} versions; a "
            f"{target_of(cfg)} version cannot join them (one config serves all versions): "
            "publish into another repository (REPO=...) or under another name"
        )
    served = _latest_card(model_dir)
    old_geo = geometry(old)
    new_geo = geometry(cfg)
    old_norm = served.preprocessing.geometry_key()[3:] if served else None
    new_norm = card.preprocessing.geometry_key()[3:]
    if old_geo != new_geo or (old_norm is not None and old_norm != new_norm):
        raise Incompatible(
            f"{model_dir.name}: the new version's preprocessing differs from the served "
            f"versions' ({old_geo}, mean/std {old_norm} -> {new_geo}, mean/std {new_norm}); "
            "all versions share one config and one preprocess model: publish it under "
            "another model name"
        )


def backend_files() -> dict[str, Path]:
    """The python backend's files of a version: the package serve/backend, whole (its
    ``model.py`` is Triton's entry point)."""
    package = Path(serve.backend.__file__).resolve().parent
    return {p.name: p for p in sorted(package.glob("*.py"))}


def version_files(onnx_path: Path, serving: ServingConfig, engine: Path | None) -> dict[str, Path]:
    """Files of one version for the target: name in the version folder -> source."""
    if serving.target == "cpu":
        return {"model.onnx": onnx_path, **backend_files()}
    if serving.gpu_backend == "onnxruntime":
        return {"model.onnx": onnx_path}
    if engine is None:
        raise UsageError("the tensorrt_plan target needs a built engine (model.plan)")
    meta = metadata_path(engine)
    plan = plan_filename(json.loads(meta.read_text()) if meta.is_file() else {})
    files = {plan: engine, "model.onnx": onnx_path}
    return {**files, **({f"{plan}.json": meta} if meta.is_file() else {})}


def engine_plans(model_dir: Path, files: dict[str, Path]) -> dict[str, str]:
    """``cc_model_filenames`` over the existing versions and the new version's ``files``."""
    plans = repository_plans(model_dir)
    for name, src in files.items():
        if name.startswith("model.sm") and name.endswith(".plan.json"):
            plans[str(json.loads(src.read_text())["compute_capability"])] = name[: -len(".json")]
    return plans


def _publish_version(
    model_dir: Path,
    files: dict[str, Path],
    cfg,
    labels: list[str] | None,
    card: ModelCard | None = None,
) -> tuple[Path, ModelCard | None]:
    """Stage ``files`` (+ the card, completed with hashes and version), rename the stage
    to the next version, then write config (and labels). A new model gets its config
    first, so the version never appears without one."""
    fresh = not (model_dir / "config.pbtxt").is_file()
    with staged_dir(model_dir) as staging:
        for dst, src in files.items():
            copy_into(src, staging / dst)
        version = (versions(model_dir) or [0])[-1] + 1
        if card is not None:
            card = card.replace(
                version=version,
                published=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                files={f: sha256(staging / f) for f in sorted(files)},
            )
            atomic_write_text(
                staging / "model_card.json", json.dumps(card.to_dict(), indent=2) + "\n"
            )
        if fresh:
            _write_config(model_dir, cfg, labels)
        target = publish_dir(staging, model_dir / str(version))
    if not fresh:
        _write_config(model_dir, cfg, labels)
    return target, card


def _write_config(model_dir: Path, cfg, labels: list[str] | None) -> None:
    if labels is not None:
        atomic_write_text(model_dir / "labels.txt", "\n".join(labels) + "\n")
    atomic_write_text(model_dir / "config.pbtxt", config_text(cfg))


def publish(
    repo: str | Path,
    name: str,
    onnx_path: str | Path,
    card: ModelCard,
    serving: ServingConfig | None = None,
    engine: Path | None = None,
    warmup_images: list[bytes] | None = None,
) -> Published:
    """Add the model as version N+1 of ``name`` in ``repo``, with its image pipeline.
    ``warmup_images`` (encoded val images) become the configs' ``model_warmup``."""
    check_model_name(name)
    serving = serving or ServingConfig()
    repo = Path(repo)
    model_dir = repo / name
    pre_dir = repo / preprocess_model_name(name)
    labels = [sanitize_label(c) for c in card.classes]
    card = card.replace(name=name, target=serving.kind, backend=BACKEND_NAMES[serving.kind])
    cfg = classifier_config(name, card, serving)
    pre_cfg = preprocess_config(name, card, serving)
    warm = build_warmup(warmup_images or [], card, serving.warmup_batch_sizes)
    with locked(model_dir, what="publisher of this model"):
        check_compatible(model_dir, cfg, labels, card)
        files = version_files(Path(onnx_path), serving, engine)
        if serving.kind == "gpu-tensorrt":
            set_plans(cfg, engine_plans(model_dir, files))
        # The files first: a config never names a warmup file that is not there.
        warm.classifier.write(model_dir)
        warm.preprocess.write(pre_dir)
        add_warmup(cfg, warm.classifier.samples)
        add_warmup(pre_cfg, warm.preprocess.samples)
        version_dir, published = _publish_version(model_dir, files, cfg, labels, card)
        assert published is not None
        card = published
        pre_version, _ = _publish_version(pre_dir, backend_files(), pre_cfg, None)
        ens_dir = repo / image_model_name(name)
        (ens_dir / "1").mkdir(parents=True, exist_ok=True)  # an ensemble's version is empty
        _write_config(ens_dir, ensemble_config(name, card, serving), labels)
    return Published(version_dir, pre_version, ens_dir, card)
