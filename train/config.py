"""Training configuration as a dataclass; stored verbatim in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODES = ("finetune", "feature-extract")


@dataclass
class TrainConfig:
    """Everything a training run depends on (the PyTorch transfer-learning recipe by default)."""

    model_name: str = "antsbees"
    data: str = ""
    out: str = ""
    arch: str = "resnet18"
    mode: str = "finetune"
    pretrained: str = "auto"
    epochs: int = 25
    batch_size: int = 4
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    step_size: int = 7
    gamma: float = 0.1
    workers: int = 2
    seed: int = 0
    threads: int = 0
    max_train_batches: int = 0
    max_val_batches: int = 0
    download_timeout: float = 15.0
    resize: int = 256
    crop: int = 224
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("epochs", "batch_size", "step_size", "resize", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        for name in ("workers", "threads", "max_train_batches", "max_val_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)
