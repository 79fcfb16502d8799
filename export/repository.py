"""Publish an exported model into a Triton model repository as the next numeric version.

Layout::

    <repo>/<name>/config.pbtxt         model-level config (generated via ModelConfig protobuf)
    <repo>/<name>/labels.txt           one class name per line (label_filename)
    <repo>/<name>/<N>/model_card.json  everything known about version N
    <repo>/<name>/<N>/...              the target's files:

* ``cpu`` (default): ``model.onnx`` + ``model.py``, the python backend running ONNX
  Runtime on CPU (the only backend the pytriton wheel's server has);
* ``gpu`` + ``tensorrt``: ``model.plan`` (+ ``model.plan.json``), ``platform:
  "tensorrt_plan"``, KIND_GPU, max_batch_size = the engine profile's max, preferred batch
  sizes inside the profile;
* ``gpu`` + ``onnxruntime``: ``model.onnx``, ``backend: "onnxruntime"`` on KIND_GPU with
  the TensorRT execution accelerator in FP16, as in NVIDIA's examples.

A version is assembled in a non-numeric staging folder (Triton ignores those) and
renamed into place, so the server never sees a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.onnx_export import INPUT_NAME, OUTPUT_NAME
from train.checkpoint import atomic_write_bytes

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
PREPROCESS_MODEL = Path(__file__).with_name("triton_preprocess_model.py")
IMAGE_PREPROCESS = Path(__file__).resolve().parent.parent / "serve" / "preprocess.py"
IMAGE_INPUT, PIXELS = "IMAGE", "PIXELS"
KEEP_VERSIONS = 2  # the classifier's version policy: the latest 2 stay loaded
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TARGETS = ("cpu", "gpu")
GPU_BACKENDS = ("tensorrt", "onnxruntime")


@dataclass
class ServingConfig:
    """Knobs of the generated Triton model config."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    instances: int = 1
    intra_op_threads: int = 0
    target: str = "cpu"
    gpu_backend: str = "tensorrt"
    preferred_batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.gpu_backend not in GPU_BACKENDS:
            raise ValueError(f"gpu backend must be one of {GPU_BACKENDS}, got {self.gpu_backend!r}")
        if self.max_batch_size < 1 or self.instances < 1:
            raise ValueError("max_batch_size and instances must be >= 1")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} outside 1..{self.max_batch_size}")

    @property
    def kind(self) -> str:
        """``cpu``, ``gpu-tensorrt`` or ``gpu-onnxruntime``."""
        return "cpu" if self.target == "cpu" else f"gpu-{self.gpu_backend}"


def check_model_name(name: str) -> str:
    """Model names become directory names and URL parts: keep them plain."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"bad model name {name!r}: use letters, digits, '_', '-', '.' "
            "(at most 64, not starting with a symbol)"
        )
    return name


def sanitize_label(label: str) -> str:
    """Labels go one per line into labels.txt: no line breaks or control characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(label)).strip()
    if not clean:
        raise ValueError(f"class name {label!r} is empty after removing control characters")
    return clean


def build_config(name: str, ckpt: dict[str, Any], serving: ServingConfig) -> mc.ModelConfig:
    """The model-level config for ``serving.target`` (see the module docstring)."""
    pre = ckpt["preprocess"]
    cfg = mc.ModelConfig(name=name, max_batch_size=serving.max_batch_size)
    cfg.input.add(
        name=INPUT_NAME,
        data_type=mc.TYPE_FP32,
        format=mc.ModelInput.FORMAT_NCHW,
        dims=list(pre["input_size"]),
    )
    cfg.output.add(
        name=OUTPUT_NAME,
        data_type=mc.TYPE_FP32,
        dims=[int(ckpt["num_classes"])],
        label_filename="labels.txt",
    )
    cfg.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.extend(serving.preferred_batch_sizes)
    cfg.version_policy.latest.num_versions = KEEP_VERSIONS
    params = {
        # What a client needs to turn an image into the input tensor (read via the API).
        "preprocess_resize": str(pre["resize"]),
        "preprocess_crop": str(pre["crop"]),
        "preprocess_interpolation": str(pre.get("interpolation", "bilinear")),
        "input_pixel_range": "0..255 RGB",
        "arch": ckpt["arch"],
        "target": serving.kind,
    }
    if serving.target == "cpu":
        cfg.backend = "python"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=serving.instances)
        params["onnx_file"] = "model.onnx"
        params["intra_op_threads"] = str(serving.intra_op_threads)
    elif serving.gpu_backend == "tensorrt":
        cfg.platform = "tensorrt_plan"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=serving.instances)
    else:
        cfg.backend = "onnxruntime"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=serving.instances)
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accel.parameters["precision_mode"] = "FP16"
        accel.parameters["max_workspace_size_bytes"] = str(1 << 30)
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def config_text(cfg: mc.ModelConfig) -> str:
    """Protobuf text format, as Triton reads it."""
    return text_format.MessageToString(cfg)


def parse_config(text: str) -> mc.ModelConfig:
    """Strict parse of a config.pbtxt (unknown fields are errors)."""
    return text_format.Parse(text, mc.ModelConfig())


def versions(model_dir: Path) -> list[int]:
    """Numeric version folders present, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _signature(cfg: mc.ModelConfig) -> tuple:
    return (
        [(i.name, list(i.dims), i.data_type) for i in cfg.input],
        [(o.name, list(o.dims), o.data_type) for o in cfg.output],
    )


def _check_compatible(model_dir: Path, cfg: mc.ModelConfig, labels: list[str]) -> None:
    """A new version must keep the served signature (inputs, outputs, labels) and target."""
    cfg_path, labels_path = model_dir / "config.pbtxt", model_dir / "labels.txt"
    if not cfg_path.is_file() or not versions(model_dir):
        return
    old = parse_config(cfg_path.read_text())
    old_labels = labels_path.read_text().splitlines() if labels_path.is_file() else []
    if _signature(old) != _signature(cfg) or old_labels != labels:
        raise ValueError(
            f"{model_dir.name}: the new version changes what clients see "
            f"(inputs/outputs {_signature(old)} -> {_signature(cfg)}; labels {old_labels} -> "
            f"{labels}); publish it under another model name"
        )
    old_target = old.parameters["target"].string_value if "target" in old.parameters else "cpu"
    new_target = cfg.parameters["target"].string_value
    if old_target != new_target:
        raise ValueError(
            f"{model_dir.name} in {model_dir.parent} holds {old_target} versions; a "
            f"{new_target} version cannot join them (one config serves all versions): "
            "publish into another repository (REPO=...) or under another name"
        )


def version_files(onnx_path: Path, serving: ServingConfig, engine: Path | None) -> dict[str, Path]:
    """Files of one version for the target: name in the version folder -> source."""
    if serving.target == "cpu":
        return {"model.onnx": onnx_path, "model.py": PYTHON_MODEL}
    if serving.gpu_backend == "onnxruntime":
        return {"model.onnx": onnx_path}
    if engine is None:
        raise ValueError("the tensorrt_plan target needs a built engine (model.plan)")
    meta = Path(f"{engine}.json")
    return {"model.plan": engine, **({"model.plan.json": meta} if meta.is_file() else {})}


def publish(
    repo: str | Path,
    name: str,
    onnx_path: str | Path,
    ckpt: dict[str, Any],
    card: dict[str, Any],
    serving: ServingConfig | None = None,
    engine: Path | None = None,
) -> Path:
    """Add the model as version N+1 of ``name`` in ``repo``; returns the version folder."""
    check_model_name(name)
    serving = serving or ServingConfig()
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    labels = [sanitize_label(c) for c in ckpt["classes"]]
    cfg = build_config(name, ckpt, serving)
    _check_compatible(model_dir, cfg, labels)
    files = version_files(Path(onnx_path), serving, engine)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        for dst, src in files.items():
            shutil.copyfile(src, staging / dst)
        version = (versions(model_dir) or [0])[-1] + 1
        card = {
            **card,
            "name": name,
            "version": version,
            "published": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sha256": {f: sha256(staging / f) for f in sorted(files)},
            "labels": labels,
            "target": serving.kind,
            "backend": {
                "cpu": "python (onnxruntime CPU)",
                "gpu-tensorrt": "tensorrt_plan",
                "gpu-onnxruntime": "onnxruntime + TensorRT accelerator (FP16)",
            }[serving.kind],
        }
        (staging / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        for f in staging.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(staging, 0o755)
        _write_text_atomic(model_dir / "labels.txt", "\n".join(labels) + "\n")
        _write_text_atomic(model_dir / "config.pbtxt", config_text(cfg))
        target = model_dir / str(version)
        os.rename(staging, target)  # atomic; fails rather than overwrite an existing version
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def preprocess_name(name: str) -> str:
    return f"{name}_preprocess"


def image_model_name(name: str) -> str:
    return f"{name}_image"


def preprocess_config(
    name: str, ckpt: dict[str, Any], serving: ServingConfig, max_pixels: int
) -> mc.ModelConfig:
    """Python backend (CPU): encoded image bytes -> the classifier's input pixels."""
    pre = ckpt["preprocess"]
    cfg = mc.ModelConfig(
        name=preprocess_name(name), backend="python", max_batch_size=serving.max_batch_size
    )
    cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=list(pre["input_size"]))
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=serving.instances)
    cfg.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
    cfg.version_policy.latest.num_versions = 1
    for key, value in {
        "preprocess_resize": str(pre["resize"]),
        "preprocess_crop": str(pre["crop"]),
        "preprocess_interpolation": str(pre.get("interpolation", "bilinear")),
        "max_pixels": str(max_pixels),
        "max_image_bytes": str(64 << 20),
    }.items():
        cfg.parameters[key].string_value = value
    return cfg


def ensemble_config(name: str, ckpt: dict[str, Any], serving: ServingConfig) -> mc.ModelConfig:
    """``<name>_image``: IMAGE bytes -> preprocess -> classifier -> labelled logits. The
    classifier keeps its own dynamic batching and version policy."""
    cfg = mc.ModelConfig(
        name=image_model_name(name), platform="ensemble", max_batch_size=serving.max_batch_size
    )
    cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(
        name=OUTPUT_NAME,
        data_type=mc.TYPE_FP32,
        dims=[int(ckpt["num_classes"])],
        label_filename="labels.txt",
    )
    pre = cfg.ensemble_scheduling.step.add(model_name=preprocess_name(name), model_version=-1)
    pre.input_map[IMAGE_INPUT] = IMAGE_INPUT
    pre.output_map[PIXELS] = "pixels"
    clf = cfg.ensemble_scheduling.step.add(model_name=name, model_version=-1)
    clf.input_map[INPUT_NAME] = "pixels"
    clf.output_map[OUTPUT_NAME] = OUTPUT_NAME
    cfg.parameters["classifier"].string_value = name
    return cfg


def publish_image_pipeline(
    repo: str | Path,
    name: str,
    ckpt: dict[str, Any],
    serving: ServingConfig | None = None,
    max_pixels: int = 40_000_000,
) -> dict[str, Path]:
    """Publish ``<name>_preprocess`` (next version) and the ``<name>_image`` ensemble
    beside the classifier ``name``; same atomic staging as :func:`publish`."""
    serving = serving or ServingConfig()
    repo = Path(repo)
    labels = [sanitize_label(c) for c in ckpt["classes"]]
    pre_dir = repo / preprocess_name(name)
    pre_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=pre_dir))
    try:
        shutil.copyfile(PREPROCESS_MODEL, staging / "model.py")
        shutil.copyfile(IMAGE_PREPROCESS, staging / "image_preprocess.py")
        os.chmod(staging, 0o755)
        _write_text_atomic(
            pre_dir / "config.pbtxt",
            config_text(preprocess_config(name, ckpt, serving, max_pixels)),
        )
        pre_version = pre_dir / str((versions(pre_dir) or [0])[-1] + 1)
        os.rename(staging, pre_version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ens_dir = repo / image_model_name(name)
    (ens_dir / "1").mkdir(parents=True, exist_ok=True)  # an ensemble's version is empty
    _write_text_atomic(ens_dir / "labels.txt", "\n".join(labels) + "\n")
    _write_text_atomic(ens_dir / "config.pbtxt", config_text(ensemble_config(name, ckpt, serving)))
    return {"preprocess": pre_version, "ensemble": ens_dir}
