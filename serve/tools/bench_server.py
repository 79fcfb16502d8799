"""The server ``make bench`` measures: the bench's own stack (or ``--grpc-url``'s), its admin
key, and Triton's statistics as deltas over a level (torch-free)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from serve.core import auth
from serve.tools.bench_config import BenchConfig

log = logging.getLogger(__name__)


def _server_stats(client: Any, models: list[str], headers: dict | None) -> dict[str, float]:
    """Summed statistics of the classifier (queue, compute, batches) and the failures of
    every model in ``models``."""
    tot = dict.fromkeys(
        (
            "queue_ns",
            "compute_input_ns",
            "compute_ns",
            "compute_output_ns",
            "request_ns",
            "success",
            "exec",
            "inferences",
            "fail",
        ),
        0.0,
    )
    for i, name in enumerate(dict.fromkeys(models)):
        stats = client.get_inference_statistics(
            name, as_json=True, headers=headers, client_timeout=30
        )["model_stats"]
        for s in stats:
            inf = s.get("inference_stats", {})
            tot["fail"] += float(inf.get("fail", {}).get("count", 0))
            if i:
                continue
            tot["queue_ns"] += float(inf.get("queue", {}).get("ns", 0))
            tot["compute_input_ns"] += float(inf.get("compute_input", {}).get("ns", 0))
            tot["compute_ns"] += float(inf.get("compute_infer", {}).get("ns", 0))
            tot["compute_output_ns"] += float(inf.get("compute_output", {}).get("ns", 0))
            tot["request_ns"] += float(inf.get("success", {}).get("ns", 0))
            tot["success"] += float(inf.get("success", {}).get("count", 0))
            tot["exec"] += float(s.get("execution_count", 0))
            tot["inferences"] += float(s.get("inference_count", 0))
    return tot


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Between two statistics snapshots: Triton's average executed batch and where the
    classifier's time went per request (ms): waiting in its queue, the copy into the
    python-backend stub (compute_input), ONNX Runtime and the stub's own work
    (compute_infer), the copy out (compute_output), and the whole request inside Triton
    (the rest of what the client saw is the frontends, the front and the network)."""
    d = {k: after[k] - before[k] for k in before}
    per = max(d["success"], 1.0) * 1e6
    return {
        "avg_executed_batch": d["inferences"] / d["exec"] if d["exec"] else 0.0,
        "queue_ms": d["queue_ns"] / per,
        "compute_input_ms": d["compute_input_ns"] / per,
        "compute_infer_ms": d["compute_ns"] / per,
        "compute_output_ms": d["compute_output_ns"] / per,
        "in_triton_ms": d["request_ns"] / per,
    }


class ExternalServer:
    """A server started elsewhere (the same interface as PublicServer for the sweep)."""

    def __init__(self, grpc_url: str, http_url: str) -> None:
        self.grpc_url, self.http_url = grpc_url, http_url or grpc_url

    def __enter__(self) -> ExternalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def perf_url(self, wire: str, direct: bool = False) -> tuple[str, int]:
        """A ``serve run`` of this user's (its private /dev/shm is named in the key
        folder): the front's owner listener inside its namespace, where perf_analyzer
        needs no key. Any other server: its own URL, without a key (perf_analyzer reads
        the statistics API, which then must be open)."""
        from serve.runtime.limits import OWNER_PORTS, PRIVATE_PORTS

        match = re.fullmatch(r"/proc/(\d+)/root/dev/shm", auth.shm_dir(self.grpc_url) or "")
        if not match:
            return (self.http_url if wire == "http" else self.grpc_url), 0
        ports = PRIVATE_PORTS if direct else OWNER_PORTS
        return f"127.0.0.1:{ports[0] if wire == 'http' else ports[1]}", int(match.group(1))


def bench_server_options(repo: Path, load_models: list[str] | None = None) -> Any:
    """Options of a private bundled server on free loopback ports, with the control plane
    locked as under ``serve run``."""
    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions

    return ServerOptions(
        model_repository=str(repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        load_models=load_models or ["*"],
        admin_key=auth.new_key(),
    )


def bench_stack(opts: Any, log_path: Path) -> Any:
    """``serve run``'s stack for a measurement: the front on the public ports, Triton in
    its private namespace, and the front's owner listeners where perf_analyzer reaches
    them without a key (:meth:`PublicServer.perf_url`)."""
    from serve.runtime.stack import PublicServer

    return PublicServer(opts, log_path=log_path, owner_listeners=True)


def admin_key(srv: Any) -> str | None:
    """The key of ``srv``'s restricted APIs (ours, or the file ``serve run`` wrote)."""
    opts = getattr(srv, "opts", None)
    return (opts.admin_key if opts is not None else None) or auth.resolve_key(srv.grpc_url)


def server_context(cfg: BenchConfig, repo: Path, log_dir: Path) -> Any:
    """The bench's own stack (:func:`bench_stack`), or ``--grpc-url``'s server (its
    admin key from ``$TRAINSERVE_ADMIN_KEY`` or the key file ``serve run`` wrote)."""
    if cfg.grpc_url:
        return ExternalServer(cfg.grpc_url, cfg.http_url)
    return bench_stack(bench_server_options(repo), log_dir / "bench-server.log")
