"""How a client reaches Triton: the default URLs and a tritonclient InferenceServerClient
with deadlines and gRPC keepalive, for the classifier and the control plane alike."""

from __future__ import annotations

from typing import Any

from serve.backend.errors import UsageError
from serve.core.errors import ServerUnavailable

__all__ = ["DEFAULT_URLS", "KEEPALIVE", "make_client", "protocol_module"]

DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
# gRPC keepalive: ping an open call every 60 s, give up after 20 s without an answer;
# no pings on an idle channel (Triton's default policy would count those as strikes).
KEEPALIVE = {"keepalive_time_ms": 60_000, "keepalive_timeout_ms": 20_000}


def protocol_module(protocol: str, aio: bool = False) -> Any:
    """tritonclient's module for ``protocol`` (sync or asyncio)."""
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
        raise UsageError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


def make_client(
    protocol: str, url: str, connect_timeout: float, timeout: float, aio: bool = False
) -> Any:
    """A tritonclient InferenceServerClient with deadlines (and gRPC keepalive)."""
    if "://" in url:
        scheme, _, rest = url.partition("://")
        raise ServerUnavailable(
            f"--url takes HOST:PORT, not a URL: use {rest.rstrip('/')!r} (without "
            f"'{scheme}://'; --protocol says how to talk to it)"
        )
    module = protocol_module(protocol, aio)
    try:
        if protocol == "http":
            if aio:
                return module.InferenceServerClient(url, conn_timeout=timeout)
            return module.InferenceServerClient(
                url, connection_timeout=connect_timeout, network_timeout=timeout
            )
        keepalive = module.KeepAliveOptions(**KEEPALIVE)
        return module.InferenceServerClient(url, keepalive_options=keepalive)
    except Exception as e:  # noqa: BLE001 - a malformed URL, an unusable address
        raise ServerUnavailable(f"cannot create a {protocol} client for {url}: {e}") from e
