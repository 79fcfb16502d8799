"""``python -m serve run``: the flags, the front's limits from them, and the supervised stack."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from serve.core import auth
from serve.core.cli_common import (
    add_model_repository,
    env_int,
)
from serve.runtime.stack import FrontLimits
from serve.runtime.triton_server import LOOPBACK, ServerOptions, exec_server, run_supervised

log = logging.getLogger("serve.cli")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_model_repository(p)
    p.add_argument(
        "--host",
        default=LOOPBACK,
        help="address to bind (loopback by default; 0.0.0.0 exposes the server)",
    )
    p.add_argument("--http-port", type=int, default=env_int("HTTP_PORT", 8000))
    p.add_argument("--grpc-port", type=int, default=env_int("GRPC_PORT", 8001))
    p.add_argument("--metrics-port", type=int, default=env_int("METRICS_PORT", 8002))
    p.add_argument("--log-verbose", type=int, default=0)
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
    f.add_argument(
        "--max-body-bytes",
        type=int,
        default=0,
        help="largest request body; 0 = sized from the repository (max batch x input size)",
    )
    f.add_argument("--max-json-bytes", type=int, default=FrontLimits.max_json_bytes)
    f.add_argument("--max-json-depth", type=int, default=FrontLimits.max_json_depth)
    f.add_argument("--max-connections", type=int, default=FrontLimits.max_connections)
    f.add_argument(
        "--max-per-client",
        type=int,
        default=FrontLimits.max_per_client,
        help="concurrent requests per client address",
    )
    f.add_argument(
        "--max-queue",
        type=int,
        default=FrontLimits.max_queue,
        help="requests inside Triton at once (running or queued); more are refused at "
        "once (503 / gRPC UNAVAILABLE). Replaces Triton's queue policy, which stalls 2.51",
    )
    f.add_argument(
        "--max-queue-bytes",
        type=int,
        default=FrontLimits.max_queue_bytes,
        help="request bytes inside Triton at once: half for --max-queue requests up to "
        "(this / 2 / --max-queue) bytes each, half for a few large ones (batches), each "
        "up to --max-body-bytes; more are refused as server busy",
    )
    f.add_argument("--idle-timeout", type=float, default=FrontLimits.idle_timeout_s)
    f.add_argument("--request-timeout", type=float, default=FrontLimits.request_timeout_s)
    f.add_argument("--tls-cert", default="", help="PEM certificate: TLS on HTTP and gRPC")
    f.add_argument("--tls-key", default="", help="PEM private key of --tls-cert (mode 0600)")
    f.add_argument(
        "--inference-key-file",
        default=None,
        metavar="FILE",
        help="inference and metadata need this key too (header inference-key)",
    )
    f.add_argument(
        "--private",
        choices=("auto", "namespace", "loopback"),
        default="auto",
        help="where Triton listens: its own network namespace (auto: when possible) or "
        "loopback ports (reachable by local users)",
    )
    p.add_argument("extra", nargs="*", help="more tritonserver flags, after --")


def front_limits(a: argparse.Namespace) -> FrontLimits:
    """The front's limits from ``serve run``'s flags."""
    inference_key = auth.read_key_file(Path(a.inference_key_file)) if a.inference_key_file else ""
    return FrontLimits(
        max_body_bytes=a.max_body_bytes,
        max_json_bytes=a.max_json_bytes,
        max_json_depth=a.max_json_depth,
        max_connections=a.max_connections,
        max_per_client=a.max_per_client,
        max_queue=a.max_queue,
        max_queue_bytes=a.max_queue_bytes,
        idle_timeout_s=a.idle_timeout,
        request_timeout_s=a.request_timeout,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        inference_key=inference_key,
        private=a.private,
    )


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
        server = PublicServer(opts, limits, inherit_output=True)
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
