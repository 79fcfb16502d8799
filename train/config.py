"""Training configuration: a dataclass, YAML recipes, and command-line overrides.

Resolution order (timm's way): dataclass defaults <- recipe file <- explicit flags.
The resolved config is saved with the run (``config.yaml``) and in every checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from serve.backend.errors import UsageError, UserError

log = logging.getLogger(__name__)

Mode = Literal["finetune", "feature-extract"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["step", "multistep", "exponential", "cosine", "inverse-time", "constant"]
Amp = Literal["none", "bf16", "fp16"]
AutoAugment = Literal["none", "trivialaugment", "randaugment"]
Device = Literal["auto", "cpu", "cuda"]
DatasetKind = Literal["auto", "imagefolder", "npz", "cifar10", "cifar100"]
Augment = Literal["random-resized-crop", "pad-crop", "none"]
Inception = Literal["naive", "reduced"]
MODES: tuple[str, ...] = get_args(Mode)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
AMP: tuple[str, ...] = get_args(Amp)
AUTO_AUGMENTS: tuple[str, ...] = get_args(AutoAugment)
DEVICES: tuple[str, ...] = get_args(Device)
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "antsbees_probe"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/hymenoptera_data"
LOCAL_DATA = Path("data/hymenoptera_data")


@dataclass
class TrainConfig:
    """Everything a training run depends on (defaults: the PyTorch transfer-learning recipe)."""

    # what and where
    model_name: str = "antsbees"
    data: str = ""
    dataset: DatasetKind = "auto"
    download: bool = False
    out: str = ""
    recipe: str = ""
    # model
    arch: str = "resnet18"
    batchnorm: bool = True
    dropout: float | None = None
    inception: Inception | None = None  # googlenet_cifar: naive | reduced (None: reduced)
    aux_weight: float = 0.0  # googlenet_cifar: auxiliary classifiers' loss weight; 0: off
    width: float | None = None  # googlenet_cifar: channel multiplier (None: 1, the paper's)
    mode: Mode = "finetune"
    pretrained: str = "auto"
    # preprocessing (None: from the arch / pretrained weights)
    resize: int | None = None
    crop: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: Augment | None = None
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    auto_augment: AutoAugment = "none"  # none | trivialaugment | randaugment (torchvision)
    # optimisation
    epochs: int = 25
    batch_size: int = 4
    optimizer: Optimizer = "sgd"
    lr: float = 0.001
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Schedule = "step"
    # epochs, or fractions of ``epochs`` (0 < x < 1): a shortened run keeps its shape
    step_size: float = 7
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    decay: float = 0.1
    min_lr: float = 0.0
    warmup_epochs: int = 0
    warmup_start: float = 0.1
    label_smoothing: float = 0.0
    # fine-tune extras (defaults: off, the tutorial's behaviour)
    head_init: list[int] = field(default_factory=list)  # ImageNet rows for the new head
    lp_epochs: int = 0  # LP-FT: first train the head this many epochs on cached features
    lp_lr: float = 0.01  # LP stage: SGD (momentum) lr, cosine to 0 over lp_epochs
    lp_batch_size: int = 32
    train_blocks: int = 0  # fine-tune only the top N backbone blocks (+ head); 0: all
    frozen_bn: bool = False  # BatchNorm statistics stay the pretrained ones (eval mode)
    ema_decay: float = 0.0  # weight EMA per step (evaluated and saved); 0: off
    # feature-extract speed-up: cache frozen-backbone features
    cache_features: bool = True
    feature_views: int = 4
    # hardware
    device: Device = "auto"
    amp: Amp = "none"
    channels_last: bool = False
    sync_bn: bool = False
    workers: int = 2
    threads: int = 0
    # reproducibility and runs
    seed: int = 0
    deterministic: bool = False
    resume: str = ""
    overwrite: bool = False  # a fresh run into an OUT that holds checkpoints replaces them
    train_subset: int = 0
    val_subset: int = 0
    max_train_batches: int = 0
    max_val_batches: int = 0
    download_timeout: float = 15.0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        # the one validation: every TrainConfig is valid from construction on
        self.validate()

    def in_epochs(self, value: float) -> int:
        """``step_size`` or a milestone in epochs: a fraction (0 < x < 1) of ``epochs``
        (rounded, at least 1), else the epoch itself."""
        return max(1, round(value * self.epochs)) if 0 < value < 1 else int(value)

    def validate(self) -> None:
        """Raise UsageError (a ValueError) naming the first bad field; run on construction."""
        choices = {
            "mode": MODES,
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "amp": AMP,
            "auto_augment": AUTO_AUGMENTS,
            "device": DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # LP-FT with epochs 0 is the linear probe alone (the head on cached features).
        lp_only = self.mode == "finetune" and self.lp_epochs > 0
        if self.epochs < (0 if lp_only else 1):
            raise UsageError(
                f"epochs must be >= 1 (0 only for mode finetune with lp_epochs > 0, the "
                f"linear probe alone), got {self.epochs}"
            )
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        for name, values in (("step_size", [self.step_size]), ("milestones", self.milestones)):
            for v in values:
                if not (0 < v < 1 or (v >= 1 and float(v).is_integer())):
                    raise UsageError(
                        f"{name} must be whole epochs (>= 1) or fractions of the run "
                        f"(0 < x < 1), got {v}"
                    )
        for name in ("resize", "crop"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.crop and self.resize and self.crop > self.resize:
            raise UsageError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.inception not in (None, "naive", "reduced"):
            raise UsageError(f"inception must be naive or reduced, got {self.inception!r}")
        if self.width is not None and not 0 < self.width <= 4:
            raise UsageError(f"width must be in (0, 4], got {self.width}")
        if not self.aux_weight >= 0:  # NaN too
            raise UsageError(f"aux_weight must be >= 0 (0: off), got {self.aux_weight}")
        if not 0 <= self.ema_decay < 1:
            raise UsageError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise UsageError(f"rrc_scale must be [min, max], 0 < min <= max <= 1: {self.rrc_scale}")
        if self.lp_lr <= 0 or self.lp_batch_size < 1:
            raise UsageError(
                f"lp_lr must be > 0 and lp_batch_size >= 1 ({self.lp_lr}, {self.lp_batch_size})"
            )
        if self.head_init and self.pretrained not in ("auto", "imagenet"):
            raise UsageError(f"head_init needs ImageNet weights, not pretrained={self.pretrained}")
        if self.schedule == "multistep" and not self.milestones:
            raise UsageError("schedule 'multistep' needs milestones (e.g. [0.5, 0.75] of the run)")
        for name in (
            "workers",
            "threads",
            "max_train_batches",
            "max_val_batches",
            "warmup_epochs",
            "train_subset",
            "val_subset",
            "feature_views",
            "lp_epochs",
            "train_blocks",
        ):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (safe for ``torch.load(weights_only=True)``, JSON and YAML)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys by name (validated as constructed)."""
        return cls(**typed_values(values))


def typed_values(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each as its TrainConfig field's type; unknown keys and values of
    the wrong type are one error naming them (the whole config is not validated here)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(
            f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    return {k: _typed(k, v, types[k]) for k, v in values.items()}


def _typed(name: str, value: Any, kind: str) -> Any:
    """``value`` as the field's scalar type (``int``, ``float``, ``bool``, ``str``, or one
    of the ``Literal`` choices above, each optionally ``| None``): YAML reads ``1e-3`` as
    a string, so a number-like string becomes a float; anything else of the wrong type is
    one clear error, not a crash later."""
    base, optional = kind.removesuffix(" | None"), kind.endswith(" | None")
    if value is None and optional:
        return None
    choices = get_args(globals().get(base))  # a Literal alias of this module: its values
    if choices:
        if value not in choices:
            raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if base == "float":
        if number:
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UsageError(f"{name} must be a number, got {value!r}")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if base == "bool" and not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise UsageError(f"{name} must be a string, got {value!r}")
    return value


def recipe_path(name: str) -> Path:
    """``name`` as a file, or ``train/recipes/<name>.yaml``; unknown names list the known."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = RECIPES_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no recipe {name!r}; known: {', '.join(known)} (or a .yaml path)")


def load_recipe(name: str) -> dict[str, Any]:
    """The recipe's key/values (validated against TrainConfig's fields)."""
    path = recipe_path(name)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise UsageError(f"recipe {path} must be a mapping of config keys")
    typed_values(values)  # unknown keys, wrong types -> an error naming them
    return values


def resolve_config(
    recipe: str = DEFAULT_RECIPE, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults <- recipe <- overrides, validated (as constructed)."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
        values["recipe"] = str(recipe)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if (
        values.get("head_init")
        and "head_init" not in given
        and given.get("pretrained", "auto") not in ("auto", "imagenet")
    ):
        # the recipe's ImageNet head rows only make sense on ImageNet weights: a flag that
        # swaps the weights (pretrained none / a file) drops them; an explicit one still errors
        log.info("pretrained=%s: not using the recipe's head_init", given["pretrained"])
        values["head_init"] = []
    values.update(given)
    return TrainConfig.from_dict(values)


def default_data() -> str:
    """The default ``--data``: ``../shared/data/hymenoptera_data`` when present, else
    ``data/hymenoptera_data``."""
    return str(SHARED_DATA if SHARED_DATA.is_dir() else LOCAL_DATA)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: yaml(value)}``; config keys use ``_`` or ``-``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m train.config RECIPE KEY``: print one resolved setting. What the Makefile
    runs to name MODEL: it imports only this module (YAML, no torch), well under a second."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m train.config RECIPE KEY", file=sys.stderr)
        return 2
    try:  # serve/core/cli_common.py's rule, without importing more than YAML
        cfg = resolve_config(args[0])
        if not hasattr(cfg, args[1]):
            raise UsageError(f"no setting {args[1]!r} in a TrainConfig")
    except (UserError, OSError) as e:  # a bad recipe: one error line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(getattr(cfg, args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
