"""A model served by Triton: the Triton stages of the parity report (the version as
published, through the stack ``make serve`` runs - the front, tritonserver in its private
namespace, no admin key in any process's argv - over HTTP, gRPC and as raw images) and
``replay --url``."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.checks.stages import PixelBatches, StageName
from serve.backend.errors import UsageError
from serve.core.names import image_model_name


@dataclass
class TritonRunner:
    """``model`` at ``url``: pixels over HTTP (``TRITON_HTTP``) or gRPC (``TRITON_GRPC``),
    or the same images encoded through the ``<model>_image`` ensemble (``TRITON_IMAGE``,
    gRPC; reads ``pixels.images``)."""

    url: str
    model: str
    stage: StageName = StageName.TRITON_GRPC

    def logits(self, pixels: PixelBatches) -> np.ndarray:
        from serve.client.client import Classifier

        if self.stage == StageName.TRITON_IMAGE:
            if pixels.images is None:
                raise UsageError(f"{self.stage} runs on encoded images; none were given")
            payload = np.array([[b] for b in pixels.images], dtype=object)
            with Classifier(self.url, image_model_name(self.model)) as clf:
                return clf.logits(payload)
        protocol = "http" if self.stage == StageName.TRITON_HTTP else "grpc"
        with Classifier(self.url, self.model, protocol=protocol) as clf:
            return np.concatenate([clf.logits(b) for b in pixels.batches])


@contextlib.contextmanager
def served(publish_into: Callable[[Path], Any], model: str) -> Iterator[list[TritonRunner]]:
    """Publish into a scratch repository, serve it on free loopback ports, and yield a
    runner per Triton stage (HTTP, gRPC, raw images) against it."""
    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.stack import PublicServer

    with tempfile.TemporaryDirectory(prefix="parity-repo-") as tmp:
        repo = Path(tmp) / "repo"
        publish_into(repo)
        opts = ServerOptions(
            model_repository=str(repo),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
        )
        with PublicServer(opts, log_path=Path(tmp) / "server.log") as server:
            yield [
                TritonRunner(server.http_url, model, StageName.TRITON_HTTP),
                TritonRunner(server.grpc_url, model, StageName.TRITON_GRPC),
                TritonRunner(server.grpc_url, model, StageName.TRITON_IMAGE),
            ]
