"""The asyncio classifier: many requests in flight over one tritonclient aio client
(HTTP or gRPC; no torch), every call bounded by ``asyncio.wait_for``. Imported from
serve/client/client.py (see its docstring for what the clients learn from the server)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from serve.backend.preprocess import DEFAULT_LIMITS, ImageSource
from serve.client.classifier_base import ClassifierBase, server_image_error
from serve.client.connect import DEFAULT_URLS, make_client, protocol_module
from serve.client.model_info import ModelInfo, Prediction, predictions
from serve.core.errors import ClientError, ModelNotReady, ServerUnavailable, classify_error


class AsyncClassifier(ClassifierBase):
    """asyncio variant for many requests in flight (tritonclient's aio clients); every
    call is bounded by ``asyncio.wait_for``.

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
        timeout: float,
        connect_timeout: float,
    ) -> None:
        self.protocol = protocol
        self.module = protocol_module(protocol, aio=True)
        self.url = url or DEFAULT_URLS[protocol]
        self.model, self.version = model, version
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.limits = DEFAULT_LIMITS
        self.client = make_client(protocol, self.url, connect_timeout, timeout, aio=True)
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
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> AsyncClassifier:
        self = cls(url, model, protocol, version, max_batch, timeout, connect_timeout)
        try:
            if not await self._call(
                "model readiness", connect_timeout, self.client.is_model_ready, model, version
            ):
                raise ModelNotReady(f"model '{model}' is not ready on {self.url}")
            kw = {"as_json": True} if protocol == "grpc" else {}
            meta = await self._call(
                "metadata", connect_timeout, self.client.get_model_metadata, model, version, **kw
            )
            config = await self._call(
                "config", connect_timeout, self.client.get_model_config, model, version, **kw
            )
        except BaseException:
            await self.close()
            raise
        self.info = ModelInfo.from_api(model, meta, config.get("config", config))
        self.max_batch = max(1, min(max_batch, self.info.max_batch_size or max_batch))
        return self

    async def _call(self, what: str, deadline: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.wait_for(fn(*args, **kwargs), deadline)
        except TimeoutError as e:
            raise ServerUnavailable(
                f"{what}: no answer from {self.url} ({self.protocol}) within {deadline:g} s"
            ) from e
        except ClientError:
            raise
        except Exception as e:  # noqa: BLE001 - aiohttp / grpc.aio transport errors
            bad = server_image_error(e)
            if bad is not None:
                raise bad from e
            raise classify_error(e, what, self.url, self.protocol, self.model, self.version) from e

    async def classify(
        self, images: Sequence[ImageSource], top_k: int = 1
    ) -> list[list[Prediction]]:
        top_k = max(1, min(int(top_k), self.info.num_classes))
        batch = self.encode(images)
        results: list[list[Prediction]] = []
        for chunk in self._chunks(batch):
            inp = self._inputs(chunk)
            inp.set_data_from_numpy(chunk)
            result = await self._call(
                "inference",
                self.timeout,
                self.client.infer,
                self.model,
                [inp],
                model_version=self.version,
                outputs=self._outputs(self.info.num_classes),
            )
            results += predictions(result.as_numpy(self.info.output_name), len(chunk), top_k)
        return results

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()
