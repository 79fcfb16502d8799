"""The model card (torch-free): a :class:`ModelCard` says everything the next stage needs
about a model - architecture, classes, input tensor, eval preprocessing and where
normalization happens, provenance (including the pretrained fallback), metrics, parity
and precision, files with their sha256, cost per image - in the spirit of timm's
``PretrainedCfg`` and torchvision's ``Weights.meta``. Training writes it into every
checkpoint; export completes it and publishes it as ``<version>/model_card.json``;
serving, benchmarks and clients read it. ``ModelCard.from_dict`` validates strictly
(serve/core/card_reader.py) and names the first thing that is wrong; the published card
holds no machine-local path (file names and hashes only). With serve/core/names.py (the
tensor, model and parameter names) it is the contract every stage shares."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.backend.preprocess import DEFAULT_INTERPOLATION, RESAMPLING
from serve.core.card_reader import CardError, build
from serve.core.names import INPUT_NAME, OUTPUT_NAME, PIXEL_RANGE

SCHEMA = "trainserve.model_card/1"

NORMALIZATION = ("graph", "input")  # inside the exported graph | the caller normalizes
PRECISIONS = ("fp32", "fp16", "int8")
TARGET_KINDS = ("", "cpu", "gpu-tensorrt", "gpu-onnxruntime")

_PATH = re.compile(r"(?<![\w.-])(?:~|\.{1,2})?(?:/[^\s/'\"():;,]+)+/?")


def redact_paths(text: str) -> str:
    """``text`` with every file path (``/abs/x.pth``, ``../rel/y``, ``~/z``) cut to its last
    component: what a published card may say about local files."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)


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
        return build(cls, data, "card")

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """A card file (``model_card.json``), validated; one that is not JSON (truncated,
        edited by hand) is a CardError too."""
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CardError(f"{path} is not a JSON model card ({e})") from e
        return cls.from_dict(data)
