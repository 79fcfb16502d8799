"""The error family beyond its root, and the client's error types with how a
tritonclient/transport error maps onto them (torch-free).

The root - ``TrainServeError``, ``UserError`` (one ``error:`` line, exit 2) and
``UsageError`` - is ``serve/backend/errors.py``, at the bottom of the house (the code
Triton runs raises it too). Here: :class:`SetupError` (a machine that lacks what is
needed), :class:`GateRefused` (a quality gate refused a model: exit 3) and the client's
errors - every error a caller sees is a :class:`ClientError` subclass (or an
``ImageError`` for a bad local image)."""

from __future__ import annotations

from serve.backend.errors import TrainServeError, UserError


class SetupError(UserError, RuntimeError):
    """The machine lacks or refuses what a command needs (a CUDA device, a package, a
    server or front that starts): the user fixes the setup, not the code."""


class GateRefused(TrainServeError, RuntimeError):
    """A quality gate (parity, accuracy) refused to let a model through: exit code 3."""


class ClientError(UserError, RuntimeError):
    """Base class of the client's errors below."""


class ServerUnavailable(ClientError):
    """No Triton server answers at the URL (or it did not answer within the deadline)."""


class ModelNotReady(ClientError):
    """The server answers but the model (version) is not loaded."""


class InferenceFailed(ClientError):
    """The server rejected or failed a request; the message is the server's."""


class Unauthorized(ClientError):
    """The server refused a control-plane call: the admin key is missing or wrong."""


class ServerBusy(ClientError):
    """The public front refused the request for now: Triton holds its request bound, or
    this client its concurrency share. A retry after a pause can succeed."""


# What the front's refusals look like: its own message, or - for a gRPC request whose
# body HAProxy 2.6 had not read yet - the RST_STREAM(CANCEL) it sends after its answer,
# which gRPC reports instead of the answer (haproxy issue #1219, fixed after 2.6).
BUSY_MARKERS = ("server busy", "too many concurrent requests", "rst_stream")

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
    "no available versions",
    *BUSY_MARKERS,
)

UNREACHABLE_MARKERS = (
    "failed to connect",
    "connection refused",
    "unavailable",
    "connect call",
    "name or service not known",
    "deadline exceeded",
    "timed out",
    "timeout",
    "cannot connect",
    "connection reset",
)

NOT_READY_MARKERS = (
    "not found",
    "not ready",
    "unknown model",
    "unavailable model",
    "is not loaded",
    "no available versions",
)


def is_transient(error: Exception) -> bool:
    """True for errors an idempotent request may retry (never for bad input)."""
    if isinstance(error, ServerUnavailable | ModelNotReady | ServerBusy):
        return True
    text = str(error).lower()
    return (
        "bad image" not in text
        and "unexpected" not in text
        and any(m in text for m in TRANSIENT_MARKERS)
    )


def classify_error(
    e: BaseException, what: str, url: str, protocol: str, model: str, version: str = ""
) -> ClientError:
    """The ClientError for a tritonclient/transport exception ``e`` raised by ``what``
    (an image the server could not decode is the client's ``server_image_error``)."""
    text = str(e)
    lowered = text.lower()
    if "this is the " in lowered and " port" in lowered:  # the front: the wrong port
        return ServerUnavailable(f"{url} ({protocol}): {text}")
    if any(s in lowered for s in BUSY_MARKERS):
        return ServerBusy(
            f"{what} refused by {url} for now (server busy: the front's request bound or "
            f"this client's concurrency share is reached; retry later): {text}"
        )
    if protocol == "http" and "connection closed" in lowered and "liveness" in what:
        return ServerUnavailable(
            f"{url} closed the connection before answering HTTP: if it is the gRPC port, "
            f"use --protocol grpc there, or the HTTP port (default 8000) ({text})"
        )
    if "expected http/" in lowered or "rtsp/ or ice/" in lowered:
        return ServerUnavailable(
            f"{url} did not answer HTTP ({protocol}): is it the gRPC port? Use --protocol "
            f"grpc there, or the HTTP port (default 8000) with --protocol http"
        )
    if "bad image" not in lowered and any(s in lowered for s in UNREACHABLE_MARKERS):
        return ServerUnavailable(f"no Triton server at {url} ({protocol}): {text}")
    if "no such public model" in lowered or "not a public route" in lowered:
        v = f" version {version}" if version else ""
        return ModelNotReady(f"model '{model}'{v} is not served by {url}: {text}")
    if "restricted" in lowered or "unauthorized" in lowered or "permission" in lowered:
        return Unauthorized(f"{what} refused by {url}: {text}")
    if any(s in lowered for s in NOT_READY_MARKERS):
        v = f" version {version}" if version else ""
        return ModelNotReady(f"model '{model}'{v} is not ready on {url}: {text}")
    return InferenceFailed(f"{what} failed: {text}")
