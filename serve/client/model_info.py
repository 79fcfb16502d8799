"""What a client knows about a served model, learned from the server's metadata and
config, and how Triton's classification extension is read back (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.backend.preprocess import DEFAULT_INTERPOLATION, ResizeCrop
from serve.core.errors import ClientError
from serve.core.names import PARAM_CROP, PARAM_INTERPOLATION, PARAM_RESIZE


@dataclass(frozen=True)
class Prediction:
    """One class of one image."""

    label: str
    probability: float
    index: int
    logit: float


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about a served model."""

    name: str
    input_name: str
    input_dtype: str
    input_shape: list[int]
    output_name: str
    num_classes: int
    max_batch_size: int
    geometry: ResizeCrop | None

    @property
    def raw(self) -> bool:
        """True when the model takes encoded image bytes."""
        return self.input_dtype == "BYTES"

    @classmethod
    def from_api(cls, name: str, meta: dict[str, Any], config: dict[str, Any]) -> ModelInfo:
        if len(meta["inputs"]) != 1 or len(meta["outputs"]) != 1:
            raise ClientError(f"model '{name}' must have one input and one output")
        inp, out = meta["inputs"][0], meta["outputs"][0]
        max_batch = int(config.get("max_batch_size", 0))
        shape = [int(d) for d in inp["shape"][1 if max_batch else 0 :]]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        geometry = None
        if inp["datatype"] == "FP32":
            try:
                geometry = ResizeCrop(
                    int(params[PARAM_RESIZE]),
                    int(params[PARAM_CROP]),
                    params.get(PARAM_INTERPOLATION, DEFAULT_INTERPOLATION),
                )
            except KeyError as e:
                raise ClientError(
                    f"model '{name}' config lacks parameter {e}; was it published by `make export`?"
                ) from e
            if shape != [3, geometry.crop, geometry.crop]:
                raise ClientError(
                    f"model '{name}' input {shape} does not match crop {geometry.crop}"
                )
        elif inp["datatype"] != "BYTES":
            raise ClientError(
                f"model '{name}' input is {inp['datatype']}: neither pixels "
                "(FP32) nor encoded images (BYTES)"
            )
        return cls(
            name,
            inp["name"],
            inp["datatype"],
            shape,
            out["name"],
            int(out["shape"][-1]),
            max_batch,
            geometry,
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def parse_classification(entries: np.ndarray) -> list[tuple[float, int, str]]:
    """Triton classification strings ``b"score:index:label"`` -> (score, index, label)."""
    out = []
    for raw in entries:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        score, index, *label = text.split(":", 2)
        out.append((float(score), int(index), label[0] if label else index))
    return out


def predictions(entries: np.ndarray, n: int, top_k: int) -> list[list[Prediction]]:
    """Classification-extension rows (all classes) -> top-k Predictions per image."""
    results = []
    for row in entries.reshape(n, -1):
        parsed = parse_classification(row)
        probs = softmax(np.array([s for s, _, _ in parsed]))
        ranked = sorted(zip(parsed, probs, strict=True), key=lambda t: -t[0][0])[:top_k]
        results.append(
            [Prediction(label, float(p), idx, score) for (score, idx, label), p in ranked]
        )
    return results
