"""Classify images with a model served by Triton, over HTTP or gRPC (tritonclient; no torch).

The client learns everything from the server: input name/shape/datatype from the model
metadata, the eval geometry (resize, crop, interpolation) from the model config's
parameters, and class labels through Triton's classification extension (the model's
``labels.txt``). Probabilities are the softmax of the logits.

* a pixel model (``antsbees``, FP32 NCHW): images are decoded and resized here, exactly
  like the training eval transform;
* a raw-image model (``antsbees_image``, BYTES): encoded files are sent as they are and
  the server preprocesses them.

Every call has a deadline: ``connect_timeout`` for liveness, metadata, config and
shared-memory registration, ``timeout`` for inference (gRPC ``client_timeout``; HTTP
connection/network timeouts; ``asyncio.wait_for`` in the async client); gRPC channels
send keepalive pings during long calls. Errors are :mod:`serve.core.errors` types.
tritonclient's HTTP client is not thread-safe (gevent): use one Classifier per thread,
or :class:`AsyncClassifier` for many requests in flight.

The async client is serve/client/async_classifier.py and what both share (encoding,
batching) serve/client/classifier_base.py; every name still imports from here.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from serve.backend.preprocess import DEFAULT_LIMITS, ImageError, ImageSource, Limits, describe
from serve.client.classifier_base import (
    ClassifierBase,
    server_image_error,
)
from serve.client.connect import DEFAULT_URLS, make_client, protocol_module
from serve.client.model_info import ModelInfo, Prediction, predictions
from serve.client.shared_memory import SharedMemoryPool, is_unknown_region
from serve.core import auth
from serve.core.errors import (
    ClientError,
    InferenceFailed,
    ModelNotReady,
    ServerUnavailable,
    classify_error,
    is_transient,
)


def local_replicas(url: str, key: str | None) -> list[str]:
    """The names of the local replicas behind the front at ``url`` ([]: a single server)."""
    from serve.client.admin import replicas

    reps = replicas(url, key)
    return [r.name for r in reps if r.local] if len(reps) > 1 else []


__all__ = ["Classifier"]


class Classifier(ClassifierBase):
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
        connect_timeout: float = 10.0,
        max_batch: int = 32,
        max_pixels: int | None = None,
        retries: int = 0,
        backoff: float = 0.25,
        shared_memory: bool = False,
        shm_regions: int = 8,
        admin_key: str | None = None,
    ) -> None:
        """``shared_memory=True`` sends pixel tensors through system shared memory
        (serve/client/shared_memory.py): the server must run on this machine, and registering
        regions needs the server's admin key (``admin_key``, else found for ``url``)."""
        self.protocol = protocol
        self.module = protocol_module(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.model, self.version = model, version
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.retries, self.backoff = max(0, retries), backoff
        self.limits = DEFAULT_LIMITS if max_pixels is None else Limits(max_pixels=max_pixels)
        self.client = make_client(protocol, self.url, connect_timeout, timeout)
        self._pool: SharedMemoryPool | None = None
        # the version of ``model`` that answered the last request (an ensemble answers as
        # its own version)
        self.last_version = ""
        try:
            self.info = self._describe_model()
            self.max_batch = max(1, min(max_batch, self.info.max_batch_size or max_batch))
            if shared_memory and not self.info.raw:
                key = admin_key or auth.resolve_key(self.url)
                self._pool = SharedMemoryPool(
                    self.client,
                    max_regions=shm_regions,
                    timeout=timeout,
                    call_kwargs=self._call_kwargs(connect_timeout, auth.headers(key)),
                    shm_dir=lambda: auth.shm_dir(self.url),
                    replicas=lambda: local_replicas(self.url, key),
                )
                with self._pool.lease(1):  # register one region now: a remote server fails here
                    pass
        except BaseException:
            self.close()
            raise

    def _call_kwargs(self, deadline: float, headers: dict[str, str] | None = None) -> dict:
        kw: dict[str, Any] = {"headers": headers} if headers else {}
        if self.protocol == "grpc":
            kw["client_timeout"] = deadline
        return kw

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError:
            raise
        except Exception as e:  # noqa: BLE001 - tritonclient, gevent, socket errors
            bad = server_image_error(e)
            if bad is not None:
                raise bad from e
            raise classify_error(e, what, self.url, self.protocol, self.model, self.version) from e

    def _why_not_live(self) -> str:
        """HTTP: what the port said instead (the front's metrics port names the others)."""
        if self.protocol != "http":
            return ""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/live", timeout=5):
                return ""
        except urllib.error.HTTPError as e:
            with contextlib.suppress(Exception):
                return f": {json.loads(e.read())['error']}"
        except Exception:  # noqa: BLE001 - the reason is a courtesy
            pass
        return ""

    def _describe_model(self) -> ModelInfo:
        kw = self._call_kwargs(self.connect_timeout)
        if not self._call("server liveness", self.client.is_server_live, **kw):
            raise ServerUnavailable(f"Triton at {self.url} is not live{self._why_not_live()}")
        if not self._call(
            "model readiness", self.client.is_model_ready, self.model, self.version, **kw
        ):
            v = f" version {self.version}" if self.version else ""
            raise ModelNotReady(f"model '{self.model}'{v} {self._why_not_ready()} on {self.url}")
        if self.protocol == "grpc":
            kw["as_json"] = True
        meta = self._call(
            "metadata", self.client.get_model_metadata, self.model, self.version, **kw
        )
        config = self._call("config", self.client.get_model_config, self.model, self.version, **kw)
        return ModelInfo.from_api(self.model, meta, config.get("config", config))

    def _why_not_ready(self) -> str:
        """ "does not exist (models here: ...)" or "is not ready", from the metadata call's
        answer (and the repository index, where the admin key is at hand)."""
        try:
            self.client.get_model_metadata(self.model, self.version)
            return "is not ready"
        except Exception as e:  # noqa: BLE001 - the message is what we want
            text = str(e).lower()
            if "unknown model" not in text and "not found" not in text:
                return "is not ready"
        if self.version:  # the model may exist: then name its versions, not the models
            try:
                meta = self.client.get_model_metadata(self.model)
                versions = meta.get("versions") if isinstance(meta, dict) else meta.versions
                if versions:
                    return (
                        f"does not exist (versions of '{self.model}' here: {', '.join(versions)})"
                    )
            except Exception:  # noqa: BLE001 - the model itself is missing: below
                pass
        names = ""
        try:
            from serve.client import admin

            key = auth.resolve_key(self.url)
            models = admin.list_models(self.url, key, self.protocol) if key else []
            names = ", ".join(sorted({m.name for m in models if m.state == "READY"}))
        except Exception:  # noqa: BLE001 - the list is a courtesy
            names = ""
        return "does not exist" + (f" (models here: {names})" if names else "")

    def _send(self, batch: np.ndarray, class_count: int) -> np.ndarray:
        inp = self._inputs(batch)
        kwargs: dict[str, Any] = {
            "model_version": self.version,
            "outputs": self._outputs(class_count),
        }
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        if self._pool is None or batch.dtype == object:
            inp.set_data_from_numpy(batch)
            result = self._call("inference", self.client.infer, self.model, [inp], **kwargs)
            self._answered_by(result)
            return result.as_numpy(self.info.output_name)
        # the owner's key goes with requests that name a region (the public front refuses
        # them otherwise: a region name in a request reads or writes that region)
        headers = self._pool.call_kwargs.get("headers")
        if headers:
            kwargs["headers"] = headers
        with self._pool.lease(batch.nbytes) as region:
            self._pool.attach(inp, batch, region)
            try:
                result = self._call("inference", self.client.infer, self.model, [inp], **kwargs)
            except ClientError as e:
                if not is_unknown_region(str(e)):
                    raise
                # The server restarted and forgot the region: register it (made anew where
                # the server is now, for a private /dev/shm), write again, resend once.
                self._pool.reregister(region)
                self._pool.attach(inp, batch, region)
                result = self._call("inference", self.client.infer, self.model, [inp], **kwargs)
            self._answered_by(result)
            return result.as_numpy(self.info.output_name)

    def _answered_by(self, result: Any) -> None:
        """Remember the model version that answered (``last_version``)."""
        with contextlib.suppress(Exception):
            response = result.get_response()
            version = (
                response.get("model_version", "")
                if isinstance(response, dict)
                else response.model_version
            )
            self.last_version = str(version)

    def _infer(self, batch: np.ndarray, class_count: int = 0) -> np.ndarray:
        attempt = 0
        while True:
            try:
                return self._send(batch, class_count)
            except ClientError as e:
                if attempt >= self.retries or not is_transient(e):
                    raise
                # Inference is idempotent: retry with exponential backoff and jitter.
                time.sleep(self.backoff * (2**attempt) * (0.5 + random.random()))
                attempt += 1

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

    def classify(self, images: Sequence[ImageSource], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k (label, probability) per image; images are paths or encoded bytes.
        Raises ImageError / InferenceFailed on the first bad image."""
        return self.classify_array(self.encode(images), top_k)

    def classify_each(
        self, images: Sequence[ImageSource], top_k: int = 1
    ) -> list[list[Prediction] | ClientError | ImageError]:
        """Like :meth:`classify`, but a bad image yields its error in its slot and the
        others are still answered (batched; a failed batch is retried image by image).
        A server that cannot be reached still raises: nothing could be answered."""
        out: list[Any] = [None] * len(images)
        encoded: list[tuple[int, np.ndarray]] = []
        for i, im in enumerate(images):
            try:
                encoded.append((i, self.encode([im])[0]))
            except ImageError as e:
                out[i] = e
        for start in range(0, len(encoded), self.max_batch):
            group = encoded[start : start + self.max_batch]
            arrays = [a for _, a in group]
            batch = np.stack(arrays) if arrays[0].dtype != object else np.array(arrays, object)
            try:
                for (i, _), preds in zip(group, self.classify_array(batch, top_k), strict=True):
                    out[i] = preds
            except (InferenceFailed, ImageError):
                for i, a in group:
                    try:
                        out[i] = self.classify_array(a[None], top_k)[0]
                    except (InferenceFailed, ImageError) as e:
                        out[i] = type(e)(f"{describe(images[i])}: {e}")
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
