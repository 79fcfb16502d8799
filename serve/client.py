"""Classify images with a model served by Triton, over HTTP or gRPC (tritonclient; no torch).

The client learns everything from the server: input name/shape/format from the
model metadata, the eval geometry (resize, crop, interpolation) from the model
config's parameters, and class labels through Triton's classification extension
(the model's ``labels.txt``). Probabilities are the softmax of the logits.

tritonclient's HTTP client is not thread-safe (gevent): use one Classifier per thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.preprocess import DEFAULT_MAX_PIXELS, ImageSource, ResizeCrop, preprocess

DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}


class ClientError(RuntimeError):
    """Base class of the errors below."""


class ServerUnavailable(ClientError):
    """No Triton server answers at the URL."""


class ModelNotReady(ClientError):
    """The server answers but the model (version) is not loaded."""


class InferenceFailed(ClientError):
    """The server rejected or failed a request; the message is the server's."""


@dataclass(frozen=True)
class Prediction:
    """One class of one image."""

    label: str
    probability: float
    index: int
    logit: float


def _protocol_module(protocol: str) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


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


class Classifier:
    """An image classifier behind a Triton server.

    >>> clf = Classifier("127.0.0.1:8001", "antsbees", protocol="grpc")
    >>> clf.classify(["ant.jpg"], top_k=2)[0][0].label
    'ants'
    """

    def __init__(
        self,
        url: str | None = None,
        model: str = "antsbees",
        *,
        protocol: str = "grpc",
        version: str = "",
        timeout: float = 60.0,
        max_batch: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.protocol = protocol
        self.module = _protocol_module(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.version = version
        self.timeout = timeout
        self.max_pixels = max_pixels
        try:
            if protocol == "http":
                self.client = self.module.InferenceServerClient(
                    self.url, connection_timeout=timeout, network_timeout=timeout
                )
            else:
                self.client = self.module.InferenceServerClient(self.url)
        except Exception as e:
            raise ServerUnavailable(f"cannot create a {protocol} client for {self.url}: {e}") from e
        self._describe_model()
        self.max_batch = max(1, min(max_batch, self.max_batch_size or max_batch))

    # -- model description -------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            raise self._classify_error(e, what) from e
        except (ConnectionError, OSError) as e:
            raise ServerUnavailable(f"no Triton server at {self.url} ({self.protocol}): {e}") from e

    def _classify_error(self, e: Exception, what: str) -> ClientError:
        text = str(e)
        lowered = text.lower()
        unreachable = (
            "failed to connect",
            "connection refused",
            "unavailable",
            "connect call",
            "name or service not known",
            "deadline exceeded",
            "timed out",
        )
        if any(s in lowered for s in unreachable):
            return ServerUnavailable(f"no Triton server at {self.url} ({self.protocol}): {text}")
        if (
            "not found" in lowered
            or "not ready" in lowered
            or "unknown model" in lowered
            or "unavailable model" in lowered
        ):
            v = f" version {self.version}" if self.version else ""
            return ModelNotReady(f"model '{self.model}'{v} is not ready on {self.url}: {text}")
        return InferenceFailed(f"{what} failed: {text}")

    def _describe_model(self) -> None:
        live = self._call("server liveness", self.client.is_server_live)
        if not live:
            raise ServerUnavailable(f"Triton at {self.url} is not live")
        ready = self._call("model readiness", self.client.is_model_ready, self.model, self.version)
        if not ready:
            v = f" version {self.version}" if self.version else ""
            raise ModelNotReady(f"model '{self.model}'{v} is not ready on {self.url}")
        if self.protocol == "grpc":
            meta = self._call(
                "metadata", self.client.get_model_metadata, self.model, self.version, as_json=True
            )
            config = self._call(
                "config", self.client.get_model_config, self.model, self.version, as_json=True
            )["config"]
        else:
            meta = self._call("metadata", self.client.get_model_metadata, self.model, self.version)
            config = self._call("config", self.client.get_model_config, self.model, self.version)
        if len(meta["inputs"]) != 1 or len(meta["outputs"]) != 1:
            raise ClientError(f"model '{self.model}' must have one input and one output")
        inp, out = meta["inputs"][0], meta["outputs"][0]
        self.input_name, self.input_dtype = inp["name"], inp["datatype"]
        self.output_name = out["name"]
        self.num_classes = int(out["shape"][-1])
        self.max_batch_size = int(config.get("max_batch_size", 0))
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.input_shape = [int(d) for d in inp["shape"][1 if self.max_batch_size else 0 :]]
        if self.input_dtype == "FP32":
            try:
                self.geometry: ResizeCrop | None = ResizeCrop(
                    int(params["preprocess_resize"]),
                    int(params["preprocess_crop"]),
                    params.get("preprocess_interpolation", "bilinear"),
                )
            except KeyError as e:
                raise ClientError(
                    f"model '{self.model}' config lacks parameter {e}; "
                    "was it published by `make export`?"
                ) from e
            if self.input_shape != [3, self.geometry.crop, self.geometry.crop]:
                raise ClientError(
                    f"model '{self.model}' input {self.input_shape} does not match "
                    f"crop {self.geometry.crop}"
                )
        else:
            self.geometry = None

    # -- inference ------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray, class_count: int = 0) -> np.ndarray:
        m = self.module
        inp = m.InferInput(self.input_name, list(batch.shape), self.input_dtype)
        inp.set_data_from_numpy(batch)
        out = m.InferRequestedOutput(self.output_name, class_count=class_count)
        kwargs: dict[str, Any] = {"model_version": self.version, "outputs": [out]}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        result = self._call("inference", self.client.infer, self.model, [inp], **kwargs)
        return result.as_numpy(self.output_name)

    def preprocess(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Images -> float32 [N, 3, crop, crop] pixels (raises ImageError naming the input)."""
        if self.geometry is None:
            raise ClientError(f"model '{self.model}' takes {self.input_dtype}, not pixels")
        return np.stack([preprocess(im, self.geometry, self.max_pixels) for im in images])

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Raw logits for a float32 [N, 3, H, W] pixel batch (split by the model's max batch)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        parts = [
            self._infer(pixels[i : i + self.max_batch])
            for i in range(0, len(pixels), self.max_batch)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes), np.float32)

    def classify_pixels(self, pixels: np.ndarray, top_k: int = 1) -> list[list[Prediction]]:
        """Top-k predictions for a pixel batch, labels from the served model's labels.txt."""
        top_k = max(1, min(int(top_k), self.num_classes))
        results: list[list[Prediction]] = []
        for i in range(0, len(pixels), self.max_batch):
            chunk = np.ascontiguousarray(pixels[i : i + self.max_batch], dtype=np.float32)
            entries = self._infer(chunk, class_count=self.num_classes)
            for row in entries.reshape(len(chunk), -1):
                parsed = parse_classification(row)
                scores = np.array([s for s, _, _ in parsed])
                probs = softmax(scores)
                results.append(
                    [
                        Prediction(label, float(p), idx, score)
                        for (score, idx, label), p in list(zip(parsed, probs, strict=True))[:top_k]
                    ]
                )
        return results

    def classify(self, images: Sequence[ImageSource], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k (label, probability) per image; images are paths or encoded bytes."""
        return self.classify_pixels(self.preprocess(images), top_k)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
