"""``python -m serve run``: the flags, the front's limits from them, and the supervised stack."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from serve.core import auth
from serve.core.cli_common import (
    add_model_repository,
    env_int,
)
from serve.core.flags import Flag, add_flags, build
from serve.runtime.limits import FrontLimits
from serve.runtime.server_options import LOOPBACK, ServerOptions
from serve.runtime.triton_server import exec_server, run_supervised

log = logging.getLogger("serve.cli")


FRONT_FLAGS = [
    Flag(
        "max_body_bytes",
        "--max-body-bytes",
        "largest request body; 0 = sized from the repository (max batch x input size)",
    ),
    Flag(
        "max_json_bytes",
        "--max-json-bytes",
        "largest HTTP JSON tensor body, or JSON header of a binary one (bytes)",
    ),
    Flag(
        "max_json_depth", "--max-json-depth", "deepest nesting of an HTTP inference request's JSON"
    ),
    Flag("max_connections", "--max-connections", "open connections per port, HTTP and gRPC each"),
    Flag(
        "max_per_client",
        "--max-per-client",
        "concurrent requests per client network (its address masked to --network-v4/-v6)",
    ),
    Flag("max_conns_per_client", "--max-conns-per-client", "open connections per address"),
    Flag(
        "max_conns_per_network",
        "--max-conns-per-network",
        "open connections per client network (more are closed when accepted; an eighth "
        "of both shares while the front holds over half of --max-connections)",
    ),
    Flag("network_v4", "--network-v4", "the prefix length of a client's IPv4 network"),
    Flag("network_v6", "--network-v6", "the prefix length of a client's IPv6 network"),
    Flag(
        "max_queue",
        "--max-queue",
        "requests inside Triton at once (running or queued); more are refused at "
        "once (503 / gRPC UNAVAILABLE). Replaces Triton's queue policy, which stalls 2.51",
    ),
    Flag(
        "max_queue_bytes",
        "--max-queue-bytes",
        "request bytes inside Triton at once: half for --max-queue requests up to "
        "(this / 2 / --max-queue) bytes each, half for a few large ones (batches), each "
        "up to --max-body-bytes; more are refused as server busy",
    ),
    Flag("idle_timeout_s", "--idle-timeout", "seconds a connection may idle between requests"),
    Flag(
        "header_timeout_s",
        "--header-timeout",
        "seconds for a request's headers (and for a new connection's first byte)",
    ),
    Flag(
        "body_timeout_s",
        "--body-timeout",
        "seconds for a request's whole body after its headers (408 / DEADLINE_EXCEEDED); "
        "a body larger than the front holds gets this plus its size at --min-body-rate",
    ),
    Flag("min_body_rate", "--min-body-rate", "bytes/s the rest of a large body must keep up"),
    Flag("request_timeout_s", "--request-timeout", "seconds the front waits for Triton's answer"),
    Flag("tls_cert", "--tls-cert", "PEM certificate: TLS on HTTP and gRPC"),
    Flag("tls_key", "--tls-key", "PEM private key of --tls-cert (mode 0600)"),
]
PRIVATE_FLAG = Flag(
    "private",
    "--private",
    "where Triton listens: its own network namespace (auto: when possible) or "
    "loopback ports (reachable by local users)",
)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_model_repository(p)
    p.add_argument(
        "--host",
        default=LOOPBACK,
        help="address to bind (loopback by default; 0.0.0.0 exposes the server)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=env_int("HTTP_PORT", 8000),
        help="HTTP/REST port ($HTTP_PORT sets the default)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=env_int("GRPC_PORT", 8001),
        help="gRPC port ($GRPC_PORT sets the default)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=env_int("METRICS_PORT", 8002),
        help="Prometheus metrics port ($METRICS_PORT sets the default)",
    )
    p.add_argument(
        "--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level (0: off)"
    )
    p.add_argument(
        "--watchdog",
        type=float,
        default=float(env_int("WATCHDOG", 10)),
        metavar="SECONDS",
        help="probe the models every SECONDS and restart one whose python-backend stub "
        "died or hangs (Triton does not); 0 = no watchdog, exec tritonserver directly",
    )
    p.add_argument(
        "--admin-key-file",
        default=None,
        metavar="FILE",
        help="the key of the control APIs (load/unload, shared memory, statistics, trace, "
        "logging); default $TRAINSERVE_ADMIN_KEY, else a new random key. It is written "
        "(mode 0600) where this project's clients find it",
    )
    p.add_argument(
        "--unrestricted",
        action="store_true",
        help="leave the control APIs open to anyone who reaches the port (loopback only)",
    )
    p.add_argument(
        "--jemalloc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="preload libjemalloc.so.2 (default: when installed)",
    )
    f = p.add_argument_group(
        "the public front (HAProxy; serve/runtime/front.py)",
        "the public ports belong to HAProxy; tritonserver runs in a private network "
        "namespace that only the front reaches",
    )
    f.add_argument(
        "--no-front",
        action="store_true",
        help="serve tritonserver's own ports directly (loopback only; its frontend has "
        "known crash bugs - for debugging)",
    )
    add_flags(f, FrontLimits, FRONT_FLAGS)
    f.add_argument(
        "--inference-key-file",
        default=None,
        metavar="FILE",
        help="inference and metadata need this key too (header inference-key)",
    )
    add_flags(f, FrontLimits, [PRIVATE_FLAG])
    r = p.add_argument_group(
        "replicas (serve/runtime/private.py)",
        "tritonservers behind the same front, balanced by least outstanding requests and "
        "health-checked on Triton's readiness; a dead one is restarted and what it failed "
        "retried on another",
    )
    r.add_argument(
        "--replicas",
        type=int,
        default=env_int("REPLICAS", 1),
        metavar="N",
        help="local tritonservers on the same model repository (default: $REPLICAS or 1)",
    )
    r.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="HOST:PORT[,key=FILE][,tls][,ca=FILE]",
        help="another machine's server behind the same front (repeatable): its HTTP "
        "port (gRPC PORT+1, metrics PORT+2, as Triton's defaults), the file of its admin "
        "key, TLS and the CA to verify it",
    )
    p.add_argument("extra", nargs="*", help="more tritonserver flags, after --")


def remote_replicas(specs: list[str], first: int) -> list:
    """``--replica`` values as replicas ``r<first>``, ``r<first+1>``, ...: UsageError
    naming a bad one."""
    from serve.backend.errors import UsageError
    from serve.runtime.front_options import Replica

    out = []
    for i, spec in enumerate(specs):
        address, *options = spec.split(",")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65534:
            raise UsageError(f"--replica {spec!r}: give HOST:PORT (the HTTP port)")
        extra: dict[str, Any] = {}
        for opt in options:
            name, _, value = opt.partition("=")
            if name == "key" and value:
                extra["admin_key"] = auth.read_key_file(Path(value))
            elif name == "tls" and not value:
                extra["tls"] = True
            elif name == "ca" and value:
                extra["ca_file"], extra["tls"] = str(Path(value).resolve()), True
            else:
                raise UsageError(
                    f"--replica {spec!r}: unknown option {opt!r} (key=FILE, tls, ca=FILE)"
                )
        http = int(port)
        out.append(
            Replica(f"r{first + i}", host.strip("[]"), http, http + 1, http + 2, False, **extra)
        )
    return out


def front_limits(a: argparse.Namespace) -> FrontLimits:
    """The front's limits from ``serve run``'s flags."""
    inference_key = auth.read_key_file(Path(a.inference_key_file)) if a.inference_key_file else ""
    return build(FrontLimits, a, [*FRONT_FLAGS, PRIVATE_FLAG], inference_key=inference_key)


def run_run(a: argparse.Namespace) -> int:
    key = auth.read_key_file(Path(a.admin_key_file)) if a.admin_key_file else ""
    opts = ServerOptions(
        model_repository=a.model_repository,
        host=a.host,
        http_port=a.http_port,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        log_verbose=a.log_verbose,
        extra_args=list(a.extra),
        restricted=not a.unrestricted,
        admin_key=key,
        jemalloc=a.jemalloc,
    )
    if not a.no_front:
        from serve.runtime.front import find_haproxy
        from serve.runtime.stack import PublicServer

        find_haproxy()  # refuse early, naming the fix
        limits = front_limits(a)
        remote = remote_replicas(a.replica, a.replicas)
        server = PublicServer(opts, limits, inherit_output=True, replicas=a.replicas, remote=remote)
        return run_supervised(opts, a.watchdog, server=server)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.error("--no-front serves Triton's own ports: loopback only (got --host %s)", a.host)
        return 2
    log.warning(
        "WARNING: --no-front: tritonserver 2.51's own ports are served directly. Its "
        "frontend crashes on some request bodies (deep JSON, gzip bombs, chunked floods) "
        "and has no idle timeout or connection cap; its admin key is in its argv. "
        "Loopback only, for debugging."
    )
    if a.watchdog > 0:
        return run_supervised(opts, a.watchdog)
    exec_server(opts)
    return 0  # not reached: exec
