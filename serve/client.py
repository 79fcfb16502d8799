"""Classify images with a model served by Triton, over HTTP or gRPC (tritonclient; no torch).

The client learns everything from the server: input name/shape/datatype from the model
metadata, the eval geometry (resize, crop, interpolation) from the model config's
parameters, and class labels through Triton's classification extension (the model's
``labels.txt``). Probabilities are the softmax of the logits.

* a pixel model (``antsbees``, FP32 NCHW): images are decoded and resized here, exactly
  like the training eval transform;
* a raw-image model (``antsbees_image``, BYTES): encoded files are sent as they are and
  the server preprocesses them.

tritonclient's HTTP client is not thread-safe (gevent): use one Classifier per thread,
or :class:`AsyncClassifier` for many requests in flight.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageSource,
    ResizeCrop,
    describe,
    preprocess,
)
from serve.shared_memory import SharedMemoryInputs, is_unknown_region

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
                    int(params["preprocess_resize"]),
                    int(params["preprocess_crop"]),
                    params.get("preprocess_interpolation", "bilinear"),
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


def _protocol_module(protocol: str, aio: bool = False) -> Any:
    if protocol == "http":
        if aio:
            import tritonclient.http.aio as module
        else:
            import tritonclient.http as module
    elif protocol == "grpc":
        if aio:
            import tritonclient.grpc.aio as module
        else:
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


def read_bytes(source: ImageSource) -> bytes:
    """Encoded image bytes from a path (or bytes as they are)."""
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return path.read_bytes()


# Server-side failures that a retry can cure: the server or a backend process restarting.
TRANSIENT_MARKERS = (
    "stub process",
    "unhealthy",
    "failed to process the request",
    "socket closed",
    "connection reset",
    "broken pipe",
    "not ready",
    "unavailable",
    "restart",
    "failed to connect",
)


def is_transient(error: Exception) -> bool:
    """True for errors an idempotent request may retry (never for bad input)."""
    if isinstance(error, ServerUnavailable | ModelNotReady):
        return True
    text = str(error).lower()
    return (
        "bad image" not in text
        and "unexpected" not in text
        and any(m in text for m in TRANSIENT_MARKERS)
    )


def _classify_error(
    e: Exception, what: str, url: str, protocol: str, model: str, version: str
) -> ClientError:
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
        "cannot connect",
        "connection reset",
    )
    if any(s in lowered for s in unreachable) and "bad image" not in lowered:
        return ServerUnavailable(f"no Triton server at {url} ({protocol}): {text}")
    if any(
        s in lowered
        for s in ("not found", "not ready", "unknown model", "unavailable model", "is not loaded")
    ):
        v = f" version {version}" if version else ""
        return ModelNotReady(f"model '{model}'{v} is not ready on {url}: {text}")
    return InferenceFailed(f"{what} failed: {text}")


class _Base:
    """What the sync and async clients share: inputs, outputs, batching."""

    protocol: str
    module: Any
    info: ModelInfo
    max_batch: int
    max_pixels: int
    version: str
    _shm: SharedMemoryInputs | None = None  # Classifier(shared_memory=True) sets it

    def encode(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Images -> the model's input array: pixels [N, 3, H, W] or bytes [N, 1]."""
        if self.info.raw:
            return np.array([[read_bytes(im)] for im in images], dtype=object)
        assert self.info.geometry is not None
        return np.stack([preprocess(im, self.info.geometry, self.max_pixels) for im in images])

    def _request(self, batch: np.ndarray, class_count: int) -> tuple[list, list]:
        m = self.module
        dtype = "BYTES" if batch.dtype == object else self.info.input_dtype
        inp = m.InferInput(self.info.input_name, list(batch.shape), dtype)
        if self._shm is not None and dtype != "BYTES":
            self._shm.attach(inp, batch)  # the request names the region; no pixels in the body
        else:
            inp.set_data_from_numpy(batch)
        return [inp], [m.InferRequestedOutput(self.info.output_name, class_count=class_count)]

    def _chunks(self, array: np.ndarray) -> list[np.ndarray]:
        return [array[i : i + self.max_batch] for i in range(0, len(array), self.max_batch)]


class Classifier(_Base):
    """An image classifier behind a Triton server.

    >>> with Classifier("127.0.0.1:8001", "antsbees", protocol="grpc") as clf:
    ...     clf.classify(["ant.jpg"], top_k=2)[0][0].label
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
        retries: int = 0,
        backoff: float = 0.25,
        shared_memory: bool = False,
    ) -> None:
        """``shared_memory=True`` sends pixel tensors through system shared memory
        (serve/shared_memory.py): the server must run on this machine."""
        self.protocol = protocol
        self.module = _protocol_module(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.model, self.version, self.timeout = model, version, timeout
        self.retries, self.backoff = max(0, retries), backoff
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
        self.info = self._describe_model()
        self.max_batch = max(1, min(max_batch, self.info.max_batch_size or max_batch))
        if shared_memory and not self.info.raw:
            self._shm = SharedMemoryInputs(self.client)
            probe = self.module.InferInput(self.info.input_name, [1], self.info.input_dtype)
            try:  # register this thread's region now, so a remote server fails here
                self._shm.attach(probe, np.zeros(1, np.float32))
            except Exception as e:
                self.close()
                why = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
                raise ClientError(
                    f"cannot use system shared memory with the server at {self.url}: {why} "
                    "(it must run on this machine and share /dev/shm with it)"
                ) from e

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except (InferenceServerException, ConnectionError, OSError) as e:
            raise _classify_error(e, what, self.url, self.protocol, self.model, self.version) from e

    def _describe_model(self) -> ModelInfo:
        if not self._call("server liveness", self.client.is_server_live):
            raise ServerUnavailable(f"Triton at {self.url} is not live")
        if not self._call("model readiness", self.client.is_model_ready, self.model, self.version):
            v = f" version {self.version}" if self.version else ""
            raise ModelNotReady(f"model '{self.model}'{v} is not ready on {self.url}")
        kw = {"as_json": True} if self.protocol == "grpc" else {}
        meta = self._call(
            "metadata", self.client.get_model_metadata, self.model, self.version, **kw
        )
        config = self._call("config", self.client.get_model_config, self.model, self.version, **kw)
        return ModelInfo.from_api(self.model, meta, config.get("config", config))

    def _infer(self, batch: np.ndarray, class_count: int = 0) -> np.ndarray:
        inputs, outputs = self._request(batch, class_count)
        kwargs: dict[str, Any] = {"model_version": self.version, "outputs": outputs}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        attempt, reregistered = 0, False
        while True:
            try:
                result = self._call("inference", self.client.infer, self.model, inputs, **kwargs)
                return result.as_numpy(self.info.output_name)
            except ClientError as e:
                if self._shm is not None and not reregistered and is_unknown_region(str(e)):
                    # The server restarted and forgot our region: register it, resend once.
                    self._call("shared memory registration", self._shm.reregister)
                    reregistered = True
                    continue
                if attempt >= self.retries or not is_transient(e):
                    raise
                # Inference is idempotent: retry with exponential backoff and jitter.
                time.sleep(self.backoff * (2**attempt) * (0.5 + random.random()))
                attempt += 1

    # kept for callers that only preprocess
    def preprocess(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Images -> float32 [N, 3, crop, crop] pixels (raises ImageError naming the input)."""
        if self.info.raw:
            raise ClientError(f"model '{self.model}' takes encoded images, not pixels")
        return self.encode(images)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for an input array (pixels or bytes), split by the model's max batch."""
        if batch.dtype != object:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts = [self._infer(chunk) for chunk in self._chunks(batch)]
        return np.concatenate(parts) if parts else np.zeros((0, self.info.num_classes), np.float32)

    def classify_array(self, batch: np.ndarray, top_k: int = 1) -> list[list[Prediction]]:
        """Top-k predictions for an encoded input array (see :meth:`encode`)."""
        top_k = max(1, min(int(top_k), self.info.num_classes))
        if batch.dtype != object:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        results: list[list[Prediction]] = []
        for chunk in self._chunks(batch):
            entries = self._infer(chunk, class_count=self.info.num_classes)
            results += predictions(entries, len(chunk), top_k)
        return results

    def classify_pixels(self, pixels: np.ndarray, top_k: int = 1) -> list[list[Prediction]]:
        return self.classify_array(pixels, top_k)

    def classify(self, images: Sequence[ImageSource], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k (label, probability) per image; images are paths or encoded bytes.
        Raises ImageError / InferenceFailed on the first bad image."""
        return self.classify_array(self.encode(images), top_k)

    def classify_each(
        self, images: Sequence[ImageSource], top_k: int = 1
    ) -> list[list[Prediction] | ClientError | ImageError]:
        """Like :meth:`classify`, but a bad image yields its error in its slot and the
        others are still answered (batched; a failed batch is retried image by image)."""
        out: list[Any] = [None] * len(images)
        encoded: list[tuple[int, np.ndarray]] = []
        for i, im in enumerate(images):
            try:
                encoded.append((i, self.encode([im])[0]))
            except ImageError as e:
                out[i] = e
        for start in range(0, len(encoded), self.max_batch):
            group = encoded[start : start + self.max_batch]
            batch = (
                np.stack([a for _, a in group])
                if group[0][1].dtype != object
                else np.array([a for _, a in group], dtype=object)
            )
            try:
                for (i, _), preds in zip(group, self.classify_array(batch, top_k), strict=True):
                    out[i] = preds
            except InferenceFailed:
                for i, a in group:
                    try:
                        out[i] = self.classify_array(a[None], top_k)[0]
                    except InferenceFailed as e:
                        out[i] = InferenceFailed(f"{describe(images[i])}: {e}")
        return out

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClassifier(_Base):
    """asyncio variant for many requests in flight (tritonclient's aio clients).

    >>> clf = await AsyncClassifier.create("127.0.0.1:8001", "antsbees_image")
    >>> results = await asyncio.gather(*(clf.classify([p]) for p in paths))
    >>> await clf.close()
    """

    def __init__(
        self,
        url: str | None,
        model: str,
        protocol: str,
        version: str,
        max_batch: int,
        max_pixels: int,
    ) -> None:
        self.protocol = protocol
        self.module = _protocol_module(protocol, aio=True)
        self.url = url or DEFAULT_URLS[protocol]
        self.model, self.version, self.max_pixels = model, version, max_pixels
        self.client = self.module.InferenceServerClient(self.url)
        self.max_batch = max_batch

    @classmethod
    async def create(
        cls,
        url: str | None = None,
        model: str = "antsbees",
        *,
        protocol: str = "grpc",
        version: str = "",
        max_batch: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> AsyncClassifier:
        self = cls(url, model, protocol, version, max_batch, max_pixels)
        try:
            if not await self._call("model readiness", self.client.is_model_ready, model, version):
                raise ModelNotReady(f"model '{model}' is not ready on {self.url}")
            kw = {"as_json": True} if protocol == "grpc" else {}
            meta = await self._call(
                "metadata", self.client.get_model_metadata, model, version, **kw
            )
            config = await self._call("config", self.client.get_model_config, model, version, **kw)
        except BaseException:
            await self.close()
            raise
        self.info = ModelInfo.from_api(model, meta, config.get("config", config))
        self.max_batch = max(1, min(max_batch, self.info.max_batch_size or max_batch))
        return self

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return await fn(*args, **kwargs)
        except (InferenceServerException, ConnectionError, OSError) as e:
            raise _classify_error(e, what, self.url, self.protocol, self.model, self.version) from e
        except Exception as e:  # aiohttp / grpc.aio transport errors
            raise _classify_error(e, what, self.url, self.protocol, self.model, self.version) from e

    async def classify(
        self, images: Sequence[ImageSource], top_k: int = 1
    ) -> list[list[Prediction]]:
        top_k = max(1, min(int(top_k), self.info.num_classes))
        batch = self.encode(images)
        results: list[list[Prediction]] = []
        for chunk in self._chunks(batch):
            inputs, outputs = self._request(chunk, self.info.num_classes)
            result = await self._call(
                "inference",
                self.client.infer,
                self.model,
                inputs,
                model_version=self.version,
                outputs=outputs,
            )
            results += predictions(result.as_numpy(self.info.output_name), len(chunk), top_k)
        return results

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()
