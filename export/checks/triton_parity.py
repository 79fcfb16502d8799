"""The Triton stages of the parity report: the model as published, through the stack
``make serve`` runs (the front, tritonserver in its private namespace: no admin key in
any process's argv), over HTTP and gRPC."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.checks.stage_outputs import PixelBatches
from serve.core.names import image_model_name


def triton_logits(
    publish_into: Callable[[Path], object],
    model_name: str,
    pixels: PixelBatches,
    images: list[bytes] | None = None,
    protocols: tuple[str, ...] = ("http", "grpc"),
) -> dict[str, np.ndarray]:
    """Publish into a scratch repository, serve it on free loopback ports, and return
    each protocol's logits for every image; with ``images`` (the same images, encoded),
    also the raw-image ensemble's logits under the key ``image``."""
    from serve.client.client import Classifier
    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.stack import PublicServer

    out: dict[str, np.ndarray] = {}
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
            for protocol in protocols:
                url = server.http_url if protocol == "http" else server.grpc_url
                with Classifier(url, model_name, protocol=protocol) as clf:
                    out[protocol] = np.concatenate([clf.logits(b) for b in pixels.batches])
            if images is not None:
                with Classifier(server.grpc_url, image_model_name(model_name)) as clf:
                    out["image"] = clf.logits(np.array([[b] for b in images], dtype=object))
    return out
