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

from serve.backend.errors import UsageError

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
HEADROOM = 64 << 10  # buffer room beyond a request body: its headers and HAProxy's own
MAX_HELD_BYTES = 4 << 20  # the largest body the front holds whole (its buffer's size)
H2_FRAME = 1 << 16  # the largest HTTP/2 frame the front accepts (HAProxy: its bufsize)
MAX_META_BYTES = 4096  # the largest non-inference gRPC message (a model name and version)
# The gRPC ModelInfer check (protobuf parsed in HAProxy's Lua): model names anywhere,
# input shapes (dimensions >= 2^31, batch over the max), nothing hidden past the buffer.
GRPC_CHECK_LUA = Path(__file__).with_name("grpc_check.lua")
# The deadline of a body too large to wait for whole (its size at the least rate).
BODY_RATE_LUA = Path(__file__).with_name("body_rate.lua")
# The replicas' control (drain, ready, their state) and their metrics, labelled.
REPLICAS_LUA = Path(__file__).with_name("replicas.lua")


REPLICA_HEADER = "trainserve-replica"  # names the replica an owner's control call is for


@dataclass(frozen=True)
class Replica:
    """One tritonserver behind the front: its name (``r0``, ``r1``, ...: HAProxy's server
    name and the value of :data:`REPLICA_HEADER`) and where its ports are. A local one
    runs in the stack's own namespace (shared memory reaches it); a remote one is another
    machine's server, reached over the network (its front's admin key, TLS)."""

    name: str
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    local: bool = True
    admin_key: str = ""  # a remote replica's: set on the owner's calls routed to it
    tls: bool = False  # a remote replica's ports speak TLS
    ca_file: str = ""  # verify the remote's certificate with this CA ("" with tls: none)
    # reached through Unix sockets ``<via>-http.sock`` etc. (the stack's egress: the front
    # runs in Triton's private namespace, which has no route out; serve/runtime/stack.py)
    via: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"r[0-9]{1,3}", self.name):
            raise UsageError(f"replica name {self.name!r} is not r<number>")
        if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,253}", self.host):
            raise UsageError(f"replica host {self.host!r} is not a plain host name or address")
        if self.admin_key and not re.fullmatch(r"[A-Za-z0-9_.~+/=-]{16,256}", self.admin_key):
            raise UsageError("keys must be 16-256 URL-safe characters")

    def address(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def endpoint(self, wire: str) -> str:
        """Where the front connects for ``wire`` (http, grpc, metrics)."""
        if self.via:
            return f"unix@{self.via}-{wire}.sock"
        port = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        return self.address(port[wire])


@dataclass
class FrontOptions:
    """What the front listens on, what it lets through, and where the Tritons are."""

    http_bind: str  # haproxy bind spec: "fd@3", "127.0.0.1:8000"
    grpc_bind: str
    metrics_bind: str
    replicas: list[Replica]  # the tritonservers behind the front, balanced
    public_models: list[str]  # models anyone may infer on
    internal_models: list[str] = field(default_factory=list)  # named in no open request
    single_input: bool = False  # every model of the repository has exactly one input
    admin_key: str = ""
    inference_key: str = ""
    max_body_bytes: int = 64 << 20
    max_json_bytes: int = 32 << 10
    max_json_depth: int = 32
    max_connections: int = 2000
    max_per_client: int = 64  # concurrent requests per client network (see network_v4/v6)
    max_conns_per_client: int = 128  # open connections per client address
    max_conns_per_network: int = 512  # open connections per client network
    network_v4: int = 24  # the prefix that makes a client's network: IPv4 /24,
    network_v6: int = 64  # IPv6 /64 (32 and 128: every address its own network)
    max_grpc_streams: int = 32  # concurrent streams per HTTP/2 connection
    max_queue: int = 256  # requests inside Triton (running or queued); more are refused
    max_queue_bytes: int = 512 << 20  # request bytes inside Triton (see serve/runtime/front.py)
    idle_timeout_s: float = 60.0  # a connection idle between requests
    header_timeout_s: float = 5.0  # a new connection's first request headers
    body_timeout_s: float = 10.0  # a request body (up to the buffer), from its headers
    min_body_rate: int = 256 << 10  # bytes/s a body beyond the buffer must keep up
    request_timeout_s: float = 120.0
    tls_pem: str = ""  # certificate + key in one file (mode 0600)
    # with inference_key: what the front puts in ``inference-key`` for Triton, which
    # restricts inference to it (so Triton, having read the body, refuses the rest cleanly)
    inference_token: str = ""
    stats_socket: str = ""  # HAProxy's runtime API (``show stat``), a 0600 Unix socket
    # listeners where every call is the owner's, without a key (HOST:PORT for HTTP and
    # gRPC): only inside Triton's private network namespace, which only the owner enters
    # (perf_analyzer runs there, so no key sits in its argv)
    owner_http: str = ""
    owner_grpc: str = ""
    # the public ports (HTTP, gRPC, metrics) as clients see them, for the messages that
    # send a client that came to the wrong one to the right one (0: unknown)
    public_ports: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if not self.replicas:
            raise UsageError("the front needs at least one replica")
        if len({r.name for r in self.replicas}) != len(self.replicas):
            raise UsageError("replica names must differ")
        if not self.public_models:
            raise UsageError("the front needs at least one public model")
        for name in [*self.public_models, *self.internal_models]:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name):
                raise UsageError(f"model name {name!r} is not a plain name")
        for what in (
            "max_body_bytes",
            "max_json_bytes",
            "max_json_depth",
            "max_connections",
            "max_per_client",
            "max_conns_per_client",
            "max_conns_per_network",
            "min_body_rate",
        ):
            if getattr(self, what) < 1:
                raise UsageError(f"{what} must be >= 1")
        if not (8 <= self.network_v4 <= 32 and 16 <= self.network_v6 <= 128):
            raise UsageError("client networks: network_v4 in 8..32, network_v6 in 16..128")
        for what in ("idle_timeout_s", "header_timeout_s", "body_timeout_s"):
            if getattr(self, what) <= 0:
                raise UsageError(f"{what} must be > 0")
        if self.max_body_bytes >= 10**9:
            raise UsageError("max_body_bytes must be under 1 GB (HAProxy 2.6 compares 32 bits)")
        if self.max_json_bytes > self.bufsize - HEADROOM:
            raise UsageError(
                f"max_json_bytes must be <= {self.bufsize - HEADROOM} (inspected in full)"
            )
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
    def held_bytes(self) -> int:
        """The largest body the front holds whole before Triton sees it: every request
        counted by ``max_queue`` (larger ones go to the large requests' backend)."""
        return min(self.small_body_bytes, self.max_body_bytes, MAX_HELD_BYTES)

    @property
    def bufsize(self) -> int:
        """HAProxy's buffer: a held body with room for its headers."""
        return self.held_bytes + HEADROOM

    @property
    def max_large_requests(self) -> int:
        """Requests over :attr:`small_body_bytes` inside Triton at once (at least one)."""
        budget = self.max_queue_bytes - self.small_body_bytes * self.max_queue
        return max(1, budget // max(self.max_body_bytes, self.small_body_bytes + 1))
