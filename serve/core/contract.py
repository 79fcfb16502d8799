"""The contract every stage shares (torch-free): tensor and model names, limits, Triton
config parameter names, and the model card.

A :class:`ModelCard` says everything the next stage needs about a model - architecture,
classes, input tensor, eval preprocessing and where normalization happens, provenance
(including the pretrained fallback), metrics, parity and precision, files with their
sha256, cost per image - in the spirit of timm's ``PretrainedCfg`` and torchvision's
``Weights.meta``. Training writes it into every checkpoint; export completes it and
publishes it as ``<version>/model_card.json``; serving, benchmarks and clients read it.
``ModelCard.from_dict`` validates and names the first thing that is wrong; the
published card holds no machine-local path (file names and hashes only).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from serve.core.errors import UserError
from serve.core.preprocess import (
    DECODE_DEADLINE_S,
    DEFAULT_INTERPOLATION,
    MAX_ASPECT_RATIO,
    MAX_FAST_WORK,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    MAX_RESIZED_PIXELS,
    RESAMPLING,
    SERVED_FORMATS,
    SLOW_LANE_SLOTS,
)

SCHEMA = "trainserve.model_card/1"

# Tensor names of every exported classifier and of the image pipeline.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_INPUT = "IMAGE"
PIXELS_OUTPUT = "PIXELS"
PIXEL_RANGE = (0.0, 255.0)

# The three models one export publishes: <name>, <name>_preprocess, <name>_image.
PREPROCESS_SUFFIX = "_preprocess"
IMAGE_SUFFIX = "_image"

# Triton config parameters a client or the preprocess model reads through the API.
PARAM_RESIZE = "preprocess_resize"
PARAM_CROP = "preprocess_crop"
PARAM_INTERPOLATION = "preprocess_interpolation"
PARAM_PIXEL_RANGE = "input_pixel_range"
PARAM_MAX_PIXELS = "max_pixels"
PARAM_MAX_RESIZED_PIXELS = "max_resized_pixels"
PARAM_MAX_ASPECT_RATIO = "max_aspect_ratio"
PARAM_MAX_IMAGE_BYTES = "max_image_bytes"
PARAM_MAX_FAST_WORK = "max_fast_work"  # decode work (pixel-passes) decoded in place
PARAM_DECODE_DEADLINE = "decode_deadline_s"  # an isolated (expensive) decode's deadline
PARAM_SLOW_LANE_SLOTS = "slow_lane_slots"  # isolated decodes at once, across instances

NORMALIZATION = ("graph", "input")  # inside the exported graph | the caller normalizes
PRECISIONS = ("fp32", "fp16", "int8")
TARGET_KINDS = ("", "cpu", "gpu-tensorrt", "gpu-onnxruntime")

__all__ = [
    "DECODE_DEADLINE_S",
    "DEFAULT_INTERPOLATION",
    "MAX_ASPECT_RATIO",
    "MAX_FAST_WORK",
    "MAX_IMAGE_BYTES",
    "MAX_PIXELS",
    "MAX_RESIZED_PIXELS",
    "SERVED_FORMATS",
    "SLOW_LANE_SLOTS",
    "CardError",
    "ModelCard",
]


class CardError(UserError, ValueError):
    """A model card (or the card part of a checkpoint) that does not follow the schema."""


_PATH = re.compile(r"(?<![\w.-])(?:~|\.{1,2})?(?:/[^\s/'\"():;,]+)+/?")


def redact_paths(text: str) -> str:
    """``text`` with every file path (``/abs/x.pth``, ``../rel/y``, ``~/z``) cut to its last
    component: what a published card may say about local files."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)


def image_model_name(name: str) -> str:
    """The raw-image ensemble of classifier ``name``."""
    return f"{name}{IMAGE_SUFFIX}"


def preprocess_model_name(name: str) -> str:
    """The server-side preprocessing model of classifier ``name``."""
    return f"{name}{PREPROCESS_SUFFIX}"


def classifier_name(model: str) -> str:
    """The classifier behind ``model`` (itself, or the one an ``_image`` ensemble feeds)."""
    for suffix in (IMAGE_SUFFIX, PREPROCESS_SUFFIX):
        if model.endswith(suffix) and len(model) > len(suffix):
            return model[: -len(suffix)]
    return model


# -- the card -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """The classifier's input: one image as ``shape`` (C, H, W), batched on a leading axis."""

    shape: list[int]
    name: str = INPUT_NAME
    dtype: str = "FP32"
    layout: str = "NCHW"
    color: str = "RGB"
    pixel_range: list[float] = field(default_factory=lambda: list(PIXEL_RANGE))

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or self.shape[0] != 3 or min(self.shape) < 1:
            raise CardError(f"input.shape must be [3, H, W], got {self.shape}")
        if self.layout != "NCHW" or self.color != "RGB":
            raise CardError(f"input must be NCHW RGB, got {self.layout} {self.color}")
        if len(self.pixel_range) != 2 or self.pixel_range[0] >= self.pixel_range[1]:
            raise CardError(f"input.pixel_range must be [low, high], got {self.pixel_range}")


@dataclass(frozen=True)
class OutputSpec:
    """The classifier's output: one row of ``num_classes`` logits per image."""

    num_classes: int
    name: str = OUTPUT_NAME
    dtype: str = "FP32"
    kind: str = "logits"


@dataclass(frozen=True)
class Preprocessing:
    """The eval path: decode -> EXIF orientation -> RGB -> Resize(shorter side to
    ``resize``, ``interpolation``) -> CenterCrop(``crop``) -> pixels in the input range ->
    ``(x / 255 - mean) / std``, done by the model itself (``normalization == "graph"``,
    every exported model) or by the caller (``"input"``, the PyTorch module of a
    checkpoint)."""

    resize: int
    crop: int
    mean: list[float]
    std: list[float]
    interpolation: str = DEFAULT_INTERPOLATION
    normalization: str = "input"

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise CardError(f"preprocessing needs 0 < crop ({self.crop}) <= resize ({self.resize})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise CardError(
                f"preprocessing.mean/std need 3 values each, std > 0 (got {self.mean}, {self.std})"
            )
        if self.interpolation not in RESAMPLING:
            raise CardError(
                f"preprocessing.interpolation {self.interpolation!r} is not one of "
                f"{', '.join(RESAMPLING)}"
            )
        if self.normalization not in NORMALIZATION:
            raise CardError(
                f"preprocessing.normalization must be one of {NORMALIZATION}, "
                f"got {self.normalization!r}"
            )

    def geometry_key(self) -> tuple:
        """What must match between versions served by one config and preprocess model."""
        return (
            self.resize,
            self.crop,
            self.interpolation,
            tuple(round(v, 6) for v in self.mean),
            tuple(round(v, 6) for v in self.std),
        )


@dataclass(frozen=True)
class Pretrained:
    """Where the starting weights came from; ``fallback`` when ``auto`` switched arch."""

    requested: str = "none"
    arch: str = ""
    source: str = "random init"
    fallback: bool = False
    note: str = ""
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass(frozen=True)
class Provenance:
    """How the model was made. ``training`` holds the resolved recipe settings without
    machine-local paths; ``dataset`` is the data folder's name, not its path."""

    pretrained: Pretrained = field(default_factory=Pretrained)
    recipe: str = ""
    mode: str = ""
    seed: int = 0
    epochs: int = 0
    dataset: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = ""  # file name only
    checkpoint_sha256: str = ""
    torch_version: str = ""


@dataclass(frozen=True)
class Metrics:
    """Validation metrics of the checkpoint the model was exported from."""

    best_val_acc: float | None = None
    best_val_loss: float | None = None
    best_epoch: int | None = None
    val_images: int | None = None
    confusion: list[list[int]] | None = None


@dataclass(frozen=True)
class ParitySummary:
    """The release gate's outcome (the full report is the run's parity.json)."""

    passed: bool
    forced: bool = False
    images: int = 0
    reference_accuracy: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ModelCard:
    """Everything known about one model (see the module docstring)."""

    name: str
    arch: str
    classes: list[str]
    input: TensorSpec
    output: OutputSpec
    preprocessing: Preprocessing
    arch_options: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=Provenance)
    metrics: Metrics = field(default_factory=Metrics)
    precision: str = "fp32"
    precision_details: dict[str, Any] = field(default_factory=dict)
    gflop_per_image: float | None = None
    parity: ParitySummary | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    target: str = ""
    backend: str = ""
    version: int | None = None
    published: str = ""
    served: dict[str, Any] | None = None
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise CardError(f"model card schema {self.schema!r} is not {SCHEMA!r}")
        if not self.name or not self.arch:
            raise CardError("model card needs a name and an arch")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise CardError(f"classes must be non-empty and unique, got {self.classes}")
        if self.output.num_classes != len(self.classes):
            raise CardError(
                f"output.num_classes {self.output.num_classes} != {len(self.classes)} classes"
            )
        if self.input.shape[1:] != [self.preprocessing.crop] * 2:
            raise CardError(
                f"input.shape {self.input.shape} does not match crop {self.preprocessing.crop}"
            )
        if self.precision not in PRECISIONS:
            raise CardError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.target not in TARGET_KINDS:
            raise CardError(f"target must be one of {TARGET_KINDS[1:]}, got {self.target!r}")
        for name, digest in self.files.items():
            if "/" in name or len(digest) != 64:
                raise CardError(f"files[{name!r}] must be a file name with a sha256 hex digest")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        name: str,
        arch: str,
        classes: list[str],
        resize: int,
        crop: int,
        mean: list[float],
        std: list[float],
        interpolation: str = DEFAULT_INTERPOLATION,
        **kwargs: Any,
    ) -> ModelCard:
        """A card from the essentials (input/output specs derived from them)."""
        return cls(
            name=name,
            arch=arch,
            classes=list(classes),
            input=TensorSpec(shape=[3, crop, crop]),
            output=OutputSpec(num_classes=len(classes)),
            preprocessing=Preprocessing(resize, crop, list(mean), list(std), interpolation),
            **kwargs,
        )

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (and ``torch.load(weights_only=True)``-safe) plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Validate ``data`` against the schema; CardError names the first problem."""
        if not isinstance(data, dict):
            raise CardError(f"a model card is a JSON object, got {type(data).__name__}")
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise CardError(f"model card schema {schema!r} is not {SCHEMA!r}")
        return _build(cls, data, "card")

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """A card file (``model_card.json``), validated; one that is not JSON (truncated,
        edited by hand) is a CardError too."""
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CardError(f"{path} is not a JSON model card ({e})") from e
        return cls.from_dict(data)


# -- a small strict reader for the dataclasses above ---------------------------------------


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise CardError(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CardError(f"{where} has unknown keys: {', '.join(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise CardError(f"{where}.{f.name} is missing")
            continue
        values[f.name] = _coerce(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**values)
    except CardError as e:
        raise CardError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise CardError(f"{where} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CardError(f"{where} must be an object, got {type(value).__name__}")
        key_t, val_t = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(val_t, v, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise CardError(f"{where} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CardError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CardError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise CardError(f"{where} must be a string, got {value!r}")
        return value
    return value
