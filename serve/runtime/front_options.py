"""What the front is told (:class:`FrontOptions`: its binds, its bounds, where Triton
is) and the names its configuration shares with the gRPC check and the clients: the
gRPC service and its open methods, the inference-key header, the refusal messages, the
Lua check's file.
serve/runtime/front.py says what the front enforces; serve/runtime/front_config.py
renders it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from serve.core.errors import UsageError

GRPC_SERVICE = "/inference.GRPCInferenceService/"
# gRPC methods anyone may call (the model name inside is checked where it can be).
GRPC_OPEN = (
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "ModelReady",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
)
INFERENCE_KEY_HEADER = "inference-key"
H2_WINDOW = 1 << 20  # HTTP/2 window HAProxy gives each client stream (the default: 64 KiB)
SHM_REFUSED = "shared-memory inputs and outputs need the admin key"  # as grpc_check.lua
BUSY = "server busy: the request queue is full or the request waited too long; retry later"
BUFSIZE = 65536  # bytes of a request HAProxy holds and inspects (headers + body start)
# The gRPC ModelInfer check (protobuf parsed in HAProxy's Lua): model names anywhere,
# input shapes (dimensions >= 2^31, batch over the max), nothing hidden past the buffer.
GRPC_CHECK_LUA = Path(__file__).with_name("grpc_check.lua")


@dataclass
class FrontOptions:
    """What the front listens on, what it lets through, and where Triton is."""

    http_bind: str  # haproxy bind spec: "fd@3", "127.0.0.1:8000"
    grpc_bind: str
    metrics_bind: str
    triton_http: str  # where Triton listens (inside its namespace): "127.0.0.1:8000"
    triton_grpc: str
    triton_metrics: str
    public_models: list[str]  # models anyone may infer on
    internal_models: list[str] = field(default_factory=list)  # named in no open request
    single_input: bool = False  # every model of the repository has exactly one input
    admin_key: str = ""
    inference_key: str = ""
    max_body_bytes: int = 64 << 20
    max_json_bytes: int = 32 << 10
    max_json_depth: int = 32
    max_connections: int = 2000
    max_per_client: int = 64  # concurrent requests per client address
    max_grpc_streams: int = 32  # concurrent streams per HTTP/2 connection
    max_queue: int = 256  # requests inside Triton (running or queued); more are refused
    max_queue_bytes: int = 512 << 20  # request bytes inside Triton (see serve/runtime/front.py)
    idle_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    request_timeout_s: float = 120.0
    tls_pem: str = ""  # certificate + key in one file (mode 0600)
    # with inference_key: what the front puts in ``inference-key`` for Triton, which
    # restricts inference to it (so Triton, having read the body, refuses the rest cleanly)
    inference_token: str = ""
    stats_socket: str = ""  # HAProxy's runtime API (``show stat``), a 0600 Unix socket

    def __post_init__(self) -> None:
        if not self.public_models:
            raise UsageError("the front needs at least one public model")
        for name in [*self.public_models, *self.internal_models]:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name):
                raise UsageError(f"model name {name!r} is not a plain name")
        for what in ("max_body_bytes", "max_json_bytes", "max_json_depth", "max_connections"):
            if getattr(self, what) < 1:
                raise UsageError(f"{what} must be >= 1")
        if self.max_body_bytes >= 10**9:
            raise UsageError("max_body_bytes must be under 1 GB (HAProxy 2.6 compares 32 bits)")
        if self.max_json_bytes > BUFSIZE - 4096:
            raise UsageError(f"max_json_bytes must be <= {BUFSIZE - 4096} (inspected in full)")
        if self.max_queue < 1 or self.max_queue_bytes < 1:
            raise UsageError("max_queue and max_queue_bytes must be >= 1")
        for key in (self.admin_key, self.inference_key):
            if key and not re.fullmatch(r"[A-Za-z0-9_.~+/=-]{16,256}", key):
                raise UsageError("keys must be 16-256 URL-safe characters")

    @property
    def small_body_bytes(self) -> int:
        """The largest request counted by ``max_queue`` (half the byte budget over it)."""
        return max(64 << 10, self.max_queue_bytes // 2 // self.max_queue)

    @property
    def max_large_requests(self) -> int:
        """Requests over :attr:`small_body_bytes` inside Triton at once (at least one)."""
        budget = self.max_queue_bytes - self.small_body_bytes * self.max_queue
        return max(1, budget // max(self.max_body_bytes, self.small_body_bytes + 1))
