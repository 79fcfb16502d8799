"""The public front: HAProxy in front of a private tritonserver (torch-free).

Triton 2.51 (the newest that nvidia-pytriton ships) has frontend bugs no model check can
reach: a deeply nested JSON body or a gzip bomb kills it, chunked bodies of tiny chunks
crash it (CVE-2025-23310), it has no idle timeout or connection cap, and its queue bound
(a dynamic-batching queue policy) makes its batcher sleep 500 ms with a request waiting
(its core turns off payload prefetching when any queue policy is set, and then wakes
the batcher only if an instance is idle at that very moment). So ``serve run`` puts the
public HTTP, gRPC and metrics ports in the hands of HAProxy (Debian's ``haproxy`` 2.6,
chosen over nginx because it counts the requests a backend holds - ``be_conn`` - so the
queue bound is one rule, and inspects request bodies without a scripting module) and
keeps Triton where only the front and its owner reach it.

What the generated configuration (:func:`render`) enforces, before Triton sees a byte:

- **Routes** (allow-list): health, server metadata, and metadata / config / readiness /
  inference of the public models (``<model>`` and ``<model>_image``) only; every other
  route - the control plane, statistics, trace, logging, shared memory, the internal
  ``<model>_preprocess`` and gRPC streaming - needs the admin key or is refused (HTTP 403,
  gRPC PERMISSION_DENIED). With ``inference_key`` set, inference needs that key too.
- **Bodies**: a size cap (default from max batch x input size), ``Content-Encoding``
  refused (415), chunked HTTP bodies refused (411: no tiny-chunk attack reaches Triton),
  JSON tensor bodies and the JSON header of binary requests capped at ``max_json_bytes``
  and refused when nested deeper than ``max_json_depth``; header size and count and URL
  length bounded (``tune.bufsize``, ``tune.http.maxhdr``); non-admin inference that names
  a shared-memory region refused.
- **Connections**: a global cap, a per-client concurrent-request cap (429), idle,
  header and slow-client timeouts, a request deadline; gRPC streams per connection capped.
- **The queue**: at most ``max_queue`` requests are inside Triton at once (running or in
  its policy-free queue); the rest are refused at once (503 / gRPC UNAVAILABLE, "server
  busy"). It is bounded in bytes too (``max_queue_bytes``): those requests may be at most
  :attr:`FrontOptions.small_body_bytes` each (half the byte budget over ``max_queue``: a
  few images), and larger ones (batches, up to ``max_body_bytes``) go through a backend of
  their own holding at most :attr:`FrontOptions.max_large_requests` (the other half).
  Nothing waits in HAProxy: a gRPC stream held there keeps its body in the
  connection's flow-control window and stalls every other stream of that connection
  once (503). Triton's own queue stays policy-free, so it never stalls.
- **TLS** on HTTP and gRPC when a certificate is given.

Secrets (the admin and inference keys, the TLS key) sit in files of mode 0600 in a
folder of mode 0700, never in an argv or an environment another user can read.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from serve.core import auth
from serve.core.errors import UsageError, UserError

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
HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy")
# The gRPC ModelInfer check (protobuf parsed in HAProxy's Lua): model names anywhere,
# input shapes (dimensions >= 2^31, batch over the max), nothing hidden past the buffer.
GRPC_CHECK_LUA = Path(__file__).with_name("grpc_check.lua")
H2_WINDOW = 1 << 20  # HTTP/2 window HAProxy gives each client stream (the default: 64 KiB)


class FrontUnavailable(UserError, RuntimeError):
    """No haproxy binary on this machine."""


def find_haproxy() -> str:
    """Path of the haproxy binary (Debian package ``haproxy``)."""
    found = shutil.which("haproxy") or next((p for p in HAPROXY_PATHS if Path(p).is_file()), None)
    if not found:
        raise FrontUnavailable(
            "haproxy is not installed: the public ports need the front (`make setup` installs "
            "it as root: apt-get install haproxy); `serve run --no-front` serves Triton "
            "directly on loopback only"
        )
    return found


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
    max_queue_bytes: int = 512 << 20  # request bytes inside Triton (see the docstring)
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


SHM_REFUSED = "shared-memory inputs and outputs need the admin key"  # as grpc_check.lua
BUSY = "server busy: the request queue is full or the request waited too long; retry later"
BUFSIZE = 65536  # bytes of a request HAProxy holds and inspects (headers + body start)


def _models_regex(names: list[str]) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def _grpc_name_prefix_hex(name: str) -> str:
    """Hex of protobuf field 1 (the model name) as the first field of a request message:
    tag 0x0a, the length byte, the name; preceded by the 5-byte gRPC frame header."""
    raw = name.encode()
    return (bytes([0x0A, len(raw)]) + raw).hex().upper()


def render(o: FrontOptions) -> str:
    """The HAProxy configuration for ``o``."""
    pub = _models_regex(o.public_models)
    depth = o.max_json_depth + 1
    timeouts = (
        f"    timeout connect 5s\n"
        f"    timeout client {o.idle_timeout_s:g}s\n"
        f"    timeout client-fin 5s\n"
        f"    timeout http-request {o.header_timeout_s:g}s\n"
        f"    timeout http-keep-alive {o.idle_timeout_s:g}s\n"
        f"    timeout server {o.request_timeout_s:g}s\n"
        "    timeout queue 1s\n"
    )
    admin = (
        f"    acl admin req.hdr({auth.HEADER}) -m str -- {o.admin_key}\n"
        f"    acl admin req.hdr({auth.GRPC_HEADER}) -m str -- {o.admin_key}\n"
        if o.admin_key
        else "    acl admin always_false\n"
    )
    if o.inference_key:
        admin += (
            f"    acl user_ok req.hdr({INFERENCE_KEY_HEADER}) -m str -- {o.inference_key}\n"
            f"    acl user_ok req.hdr(triton-grpc-protocol-{INFERENCE_KEY_HEADER}) -m str -- "
            f"{o.inference_key}\n"
        )
    else:
        admin += "    acl user_ok always_true\n"
    ssl = f" ssl crt {o.tls_pem}" if o.tls_pem else ""
    h2ssl = f" ssl crt {o.tls_pem} alpn h2" if o.tls_pem else " proto h2"

    def err(status: int, message: str) -> str:
        body = '{"error":"' + message.replace('"', "'") + '"}'
        return f"status {status} content-type application/json string '{body}'"

    def grpc_err(code: int, message: str) -> str:
        return (
            f'status 200 hdr grpc-status {code} hdr grpc-message "'
            + message.replace('"', "'").replace("%", "%%")
            + '"'
        )

    def grpc_refuse(code: int | None, message: str, cond: str, fmt: str = "") -> list[str]:
        """A refusal after the body started: drained, then answered (grpc_check.lua);
        ``fmt``: the message as a log-format string instead of ``message``; ``code`` None:
        ``txn.grpc_code`` is set already (by the Lua check) where refused."""
        fmt = '"' + (fmt or message.replace('"', "'").replace("%", "%%")) + '"'
        refused = "{ var(txn.grpc_code) -m found }"  # ``cond`` evaluated once
        drain_bytes, drain_s = o.max_body_bytes + 65536, max(1, round(o.header_timeout_s))
        set_code = f"    http-request set-var(txn.grpc_code) int({code}) if {cond}"
        return [
            *([set_code] if code is not None else []),
            f"    http-request set-var-fmt(txn.grpc_msg) {fmt} if {refused}",
            f"    http-request set-var(txn.grpc_drain) int({drain_bytes}) if {refused}",
            f"    http-request set-var(txn.grpc_drain_s) int({drain_s}) if {refused}",
            f"    http-request use-service lua.grpc_refuse if {refused}",
        ]

    internal_hex = [(n.encode().hex().upper()) for n in o.internal_models]
    spec = "/".join(
        # the public model names, and whether every model has one input (grpc_check.lua)
        o.public_models + (["@single"] if o.single_input else [])
    )
    # the owner's inference: any model name, shared memory allowed; the rest checked alike
    owner_spec = "/".join(["@owner"] + (["@single"] if o.single_input else []))
    grpc_model_first = " ".join(_grpc_name_prefix_hex(n) for n in o.public_models)
    lines = [
        "# Generated by `python -m serve run` (serve/runtime/front.py), at every start.",
        "global",
        f"    maxconn {o.max_connections + 64}",
        "    nbthread 1",  # exact queue bound; one thread is far faster than Triton here
        f"    tune.bufsize {BUFSIZE}",
        "    tune.http.maxhdr 64",
        f"    tune.h2.max-concurrent-streams {o.max_grpc_streams}",
        # a 602 KB tensor in one window instead of ten 64 KiB round trips: -0.6 ms p50 at
        # c=1 (3 runs, 3.0 -> 2.3 ms outside Triton). HAProxy still buffers bufsize per
        # stream; a stream that does not drain holds up only its own connection
        f"    tune.h2.initial-window-size {H2_WINDOW}",
        "    hard-stop-after 30s",
        f"    lua-load {GRPC_CHECK_LUA}",
        *([f"    stats socket {o.stats_socket} mode 600 level operator"] if o.stats_socket else []),
        "    log stderr format short local0 warning",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlognull",
        "    http-reuse always",
        timeouts.rstrip("\n"),
        "",
        "backend per_client",
        "    stick-table type ipv6 size 100k expire 120s store conn_cur",
        "",
        # ---------------------------------------------------------------- HTTP
        "frontend http_in",
        f"    bind {o.http_bind}{ssl}",
        f"    maxconn {o.max_connections}",
        admin.rstrip("\n"),
        "    http-request track-sc0 src table per_client",
        # whether the client's keys are right, kept before the key headers are rewritten
        "    http-request set-var(txn.key_ok) bool(1) if user_ok or admin",
        "    acl key_ok var(txn.key_ok) -m bool",
        *(
            [
                f"    http-request del-header {INFERENCE_KEY_HEADER}",
                f"    http-request set-header {INFERENCE_KEY_HEADER} {o.inference_token} if key_ok",
            ]
            if o.inference_key and o.inference_token
            else []
        ),
        f"    http-request return {err(429, 'too many concurrent requests from this client')}"
        f" if {{ sc0_conn_cur gt {o.max_per_client} }} !admin",
        "    acl health path /v2 /v2/health/live /v2/health/ready",
        f"    acl model_get path_reg ^/v2/models/{pub}(/versions/[0-9]{{1,18}})?(/ready|/config)?$",
        f"    acl model_infer path_reg ^/v2/models/{pub}(/versions/[0-9]{{1,18}})?/infer$",
        "    acl is_get method GET HEAD",
        "    acl is_post method POST",
        "    acl binary req.hdr(inference-header-content-length) -m found",
        f"    acl big_body req.hdr_val(content-length) gt {o.max_body_bytes}",
        # hdr_val is a 32-bit integer in 2.6: 10+ digits (>= 1 GB) by their count
        "    acl big_body req.hdr(content-length) -m reg ^[0-9]{10,}$",
        f"    acl big_json req.hdr_val(content-length) gt {o.max_json_bytes}",
        "    acl big_json_header req.hdr_val(inference-header-content-length)"
        f" gt {o.max_json_bytes}",
        # single quotes: HAProxy passes the pattern to PCRE as it is
        f"    acl deep_json req.body -m reg '(?:[\\[{{][^\\[\\]{{}}]*){{{depth}}}'",
        "    acl names_shm req.body,hex -m sub " + b"shared_memory_region".hex().upper(),
        # Triton 2.51 truncates a dimension of 2^32 or more and answers (batch 2^32+1 ->
        # batch 1, status 200): no valid dimension here has 10 digits
        "    acl huge_dim req.body -m reg '\"shape\"\\s*:\\s*\\[[^\\]]*[0-9]{10}'",
        "    acl chunked req.hdr(transfer-encoding) -m found",
        "    acl encoded req.hdr(content-encoding) -m found",
        "    http-request return "
        + err(415, "Content-Encoding is not accepted: send the body uncompressed")
        + " if encoded",
        "    http-request return "
        + err(411, "chunked request bodies are not accepted: send Content-Length")
        + " if chunked",
        "    http-request return "
        + err(413, f"request body over {o.max_body_bytes} bytes (the largest valid batch)")
        + " if big_body",
        f"    acl large_body req.hdr_val(content-length) gt {o.small_body_bytes}",
        # the owner's calls skip the checks below, except inference (of any model): its
        # body is checked as the public's is (a malformed body kills Triton whoever sends
        # it), but it may name internal models and shared memory, and skips the queue bound
        "    acl any_infer path_reg ^/v2/models/[^/]{1,128}(/versions/[0-9]{1,18})?/infer$",
        "    http-request allow if admin !any_infer",
        "    http-request return "
        + err(503, BUSY)
        + f" if !admin !large_body {{ be_conn(triton_http) ge {o.max_queue} }}",
        "    http-request return "
        + err(503, BUSY)
        + f" if !admin large_body {{ be_conn(triton_http_large) ge {o.max_large_requests} }}",
        "    http-request allow if health is_get",
        "    http-request return "
        + err(401, "this server needs the inference key (header inference-key)")
        + " if !key_ok !model_infer",
        "    http-request allow if model_get is_get",
        # the cheap header checks are done: now hold the body's start (up to the buffer)
        f"    http-request wait-for-body time {o.header_timeout_s:g}s if model_infer or admin",
        "    http-request return "
        + err(
            413,
            f"JSON tensor body over {o.max_json_bytes} bytes: send tensors with the binary "
            "tensor extension (binary_data=True)",
        )
        + " if model_infer !binary big_json or admin !binary big_json",
        "    http-request return "
        + err(413, f"inference JSON header over {o.max_json_bytes} bytes")
        + " if model_infer big_json_header or admin big_json_header",
        "    http-request return "
        + err(400, f"inference JSON nested deeper than {o.max_json_depth} levels")
        + " if model_infer deep_json or admin deep_json",
        "    http-request return "
        + err(400, "a shape dimension of 10 or more digits (Triton would truncate it)")
        + " if model_infer huge_dim or admin huge_dim",
        "    http-request return " + err(403, SHM_REFUSED) + " if !admin model_infer names_shm",
        "    http-request allow if model_infer is_post or admin",
        "    http-request return "
        + err(
            403,
            "not a public route: health, metadata, config and inference of "
            + ", ".join(o.public_models)
            + " (other APIs need the admin key)",
        ),
        # the owner's inference shares the public backends (and their bounds); the rest of
        # the owner's calls (control plane, statistics, watchdog probes) skip the queue
        "    use_backend triton_http_admin if admin !model_infer",
        "    use_backend triton_http_large if large_body",
        "    default_backend triton_http",
        "",
        "backend triton_http",
        f"    server triton {o.triton_http} maxconn {o.max_queue + 16}",
        "    http-error " + err(503, BUSY),
        "",
        "backend triton_http_large",  # requests over small_body_bytes: the byte bound
        f"    server triton {o.triton_http} maxconn {o.max_large_requests + 4}",
        "    http-error " + err(503, BUSY),
        "",
        "backend triton_http_admin",  # the owner's calls (watchdog probes) skip the queue
        f"    server triton {o.triton_http} maxconn 16",
        "",
        # ---------------------------------------------------------------- gRPC
        "frontend grpc_in",
        f"    bind {o.grpc_bind}{h2ssl}",
        f"    maxconn {o.max_connections}",
        admin.rstrip("\n"),
        "    http-request track-sc0 src table per_client",
        # whether the client's keys are right, kept before the key headers are rewritten
        "    http-request set-var(txn.key_ok) bool(1) if user_ok or admin",
        "    acl key_ok var(txn.key_ok) -m bool",
        *(
            [
                f"    http-request del-header {INFERENCE_KEY_HEADER}",
                f"    http-request del-header triton-grpc-protocol-{INFERENCE_KEY_HEADER}",
                f"    http-request set-header triton-grpc-protocol-{INFERENCE_KEY_HEADER} "
                f"{o.inference_token} if key_ok",
            ]
            if o.inference_key and o.inference_token
            else []
        ),
        f"    http-request return {grpc_err(8, 'too many concurrent requests from this client')}"
        f" if {{ sc0_conn_cur gt {o.max_per_client} }} !admin",
        "    acl open_method path " + " ".join(GRPC_SERVICE + m for m in GRPC_OPEN),
        f"    acl infer path {GRPC_SERVICE}ModelInfer",
        "    acl named_first req.body,bytes(5,130),hex -m beg " + grpc_model_first,
        "    acl names_shm req.body,hex -m sub " + b"shared_memory_region".hex().upper(),
        "    acl encoded req.hdr(grpc-encoding) -m found",
        "    acl encoded req.hdr(content-encoding) -m found",
        f"    acl big_body req.hdr_val(content-length) gt {o.max_body_bytes}",
        "    acl big_body req.hdr(content-length) -m reg ^[0-9]{10,}$",
        # the gRPC frame header: 1 compression byte, 4 bytes of message length
        f"    acl big_body req.body,bytes(1,4),be2dec(:,4) -m int gt {o.max_body_bytes}",
        "    acl large_body req.body,bytes(1,4),be2dec(:,4) -m int gt " + str(o.small_body_bytes),
    ]
    for h in internal_hex:
        lines.append(f"    acl names_internal req.body,hex -m sub {h}")
    if not internal_hex:
        lines.append("    acl names_internal always_false")
    lines += [
        *grpc_refuse(
            3,
            "compressed messages are not accepted",
            "encoded !{ req.hdr(grpc-encoding) -m str identity }",
        ),
        # the owner's calls skip the checks below, except inference: checked as the
        # public's is, but it may name internal models and shared memory (the Lua check's
        # "@owner") and skips the queue bound
        "    http-request allow if admin !infer",
        "    http-request return "
        + grpc_err(14, BUSY)
        + f" if !admin {{ be_conn(triton_grpc) ge {o.max_queue} }}",
        "    http-request return "
        + grpc_err(7, "not a public method (admin key needed)")
        + " if !open_method",
        "    http-request allow if { path " + GRPC_SERVICE + "ServerLive "
        f"{GRPC_SERVICE}ServerReady }}",
        "    http-request return "
        + grpc_err(16, "this server needs the inference key (metadata inference-key)")
        + f" if !key_ok !{{ path {GRPC_SERVICE}ModelInfer }}",
        f"    http-request allow if {{ path {GRPC_SERVICE}ServerMetadata }}",
        f"    http-request wait-for-body time {o.header_timeout_s:g}s",
        "    http-request return "
        + grpc_err(8, f"request message over {o.max_body_bytes} bytes (the largest valid batch)")
        + " if big_body",
        *grpc_refuse(
            7,
            "no such public model here; public models: " + ", ".join(o.public_models),
            # ModelInfer: every model name is checked in Lua (below), no hex scan needed
            "!admin !named_first or !infer names_internal",
        ),
        # the whole message as far as the buffer shows it, shared-memory parameters
        # included (serve/runtime/grpc_check.lua: it sets txn.grpc_code where it refuses)
        f"    http-request set-var(txn.grpc_why) lua.grpc_infer_check({spec}) if infer !admin",
        f"    http-request set-var(txn.grpc_why) lua.grpc_infer_check({owner_spec}) if infer admin",
        *grpc_refuse(None, "", "", fmt="%[var(txn.grpc_why)]"),
        *grpc_refuse(7, SHM_REFUSED, "!infer names_shm"),
        "    http-request return "
        + grpc_err(14, BUSY)
        + f" if !admin large_body {{ be_conn(triton_grpc_large) ge {o.max_large_requests} }}",
        f"    use_backend triton_grpc_admin if admin !{{ path {GRPC_SERVICE}ModelInfer }}",
        "    use_backend triton_grpc_large if large_body",
        "    default_backend triton_grpc",
        "",
        "backend triton_grpc",
        f"    server triton {o.triton_grpc} proto h2 maxconn {o.max_queue + 16}",
        "",
        "backend triton_grpc_large",
        f"    server triton {o.triton_grpc} proto h2 maxconn {o.max_large_requests + 4}",
        "",
        "backend triton_grpc_admin",
        f"    server triton {o.triton_grpc} proto h2 maxconn 16",
        "",
        # ---------------------------------------------------------------- metrics
        "frontend metrics_in",
        f"    bind {o.metrics_bind}",
        "    maxconn 64",
        "    http-request return " + err(404, "only /metrics here") + " if !{ path /metrics }",
        "    default_backend triton_metrics",
        "",
        "backend triton_metrics",
        f"    server triton {o.triton_metrics} maxconn 4",
        "",
    ]
    return "\n".join(lines)
