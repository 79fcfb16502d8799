"""``make bench REPLICAS=N``: one tritonserver against N behind the same front, measured in
turn in one run (torch-free).

Both stacks run side by side (``serve run``'s, Triton in its private namespace) with the
same ONNX Runtime threads per core: the default classifier config (its instances x
threads) for one replica, and for N a scratch copy of the repository whose classifier has
1/N of the instances. perf_analyzer (gRPC tensor, concurrency 4, in the stack's namespace
as ``make bench`` runs it) measures them in alternating rounds, so the machine's drift
hits both alike; the ratio's spread over the rounds is reported. Beside images/s, the CPU
time per image of each stack's serving processes (front, tritonservers, python-backend
stubs: utime + stime from /proc over the measurement, divided by the requests Triton
answered in it): a figure that a noisy, shared machine barely moves.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from statistics import median
from typing import Any

from serve.client.admin import read_metrics
from serve.tools import perf_analyzer as pa
from serve.tools import perf_analyzer_profile as pa_profile
from serve.tools.bench_config import BenchConfig
from serve.tools.proc_stats import cpu_seconds, descendants

log = logging.getLogger(__name__)

ROUNDS = 3
CONCURRENCY = 4


def answered(metrics_url: str, model: str) -> float:
    """Requests the classifier answered so far, over every replica."""
    counts = read_metrics(metrics_url)
    return sum(
        c.get("nv_inference_request_success", 0.0) for (m, _), c in counts.items() if m == model
    )


def split_instances(repo: Path, model: str, replicas: int, work: Path) -> Path:
    """A scratch repository whose classifier has 1/``replicas`` of the instances (at least
    one), each with the threads it had, the rest as in ``repo`` (linked)."""
    from serve.core.model_config import config_text, read_config
    from serve.tools.chaos import scratch_repository

    scratch = scratch_repository(repo, work)
    path = scratch / model / "config.pbtxt"
    cfg = read_config(path)
    count = sum(g.count or 1 for g in cfg.instance_group) or 1
    threads = int(cfg.parameters["intra_op_threads"].string_value or 0) or max(
        1, len(os.sched_getaffinity(0)) // count
    )
    for group in cfg.instance_group:
        group.count = max(1, (group.count or 1) // replicas)
    # the threads per instance of the one-replica config (serve/backend/classifier_model.py
    # would give a lone instance every core)
    cfg.parameters["intra_op_threads"].string_value = str(threads)
    path.write_text(config_text(cfg))
    return scratch


def compare(cfg: BenchConfig, data: Path, replicas: int) -> dict[str, Any]:
    """One stack against ``replicas``, in alternating rounds; the report's ``replicas``."""
    from serve.runtime.stack import PublicServer
    from serve.tools.bench_server import bench_server_options

    repo = Path(cfg.model_repository)
    work = Path(cfg.out) / ".replicas"
    many_repo = split_instances(repo, cfg.model, replicas, work)
    stacks = {
        "1 replica": PublicServer(
            bench_server_options(repo), log_path=work / "one.log", owner_listeners=True
        ),
        f"{replicas} replicas": PublicServer(
            bench_server_options(many_repo),
            log_path=work / "many.log",
            owner_listeners=True,
            replicas=replicas,
        ),
    }
    rows: list[dict[str, Any]] = []
    try:
        for srv in stacks.values():
            srv.start()
        for rnd in range(ROUNDS):
            for name, srv in stacks.items():
                url, pid = srv.perf_url("grpc")
                profile = pa_profile.Profile(
                    model=cfg.model,
                    url=url,
                    netns_pid=pid,
                    concurrency=CONCURRENCY,
                    input_data=str(data),
                    measurement_interval_ms=int(cfg.window * 1000),
                    stability_percentage=cfg.stability,
                    max_trials=cfg.max_trials,
                )
                assert srv.process is not None
                procs = descendants(srv.process.pid)
                cpu0, n0 = cpu_seconds(procs), answered(srv.metrics_url, cfg.model)
                try:
                    result = pa.run(profile, work / "level.csv")
                except pa.Unstable as e:
                    log.warning("%s round %d: %s", name, rnd, e)
                    continue
                cpu1, n1 = cpu_seconds(procs), answered(srv.metrics_url, cfg.model)
                row = result.rows[-1]
                rows.append(
                    {
                        "round": rnd,
                        "stack": name,
                        "throughput": row.throughput,
                        "p50_ms": row.p50_ms,
                        "p99_ms": row.p99_ms,
                        "cpu_ms_per_image": 1000 * (cpu1 - cpu0) / max(1.0, n1 - n0),
                        "stable": result.stable,
                    }
                )
                log.info(
                    "replicas round %d %-11s %6.1f img/s  p99 %6.1f ms  %5.1f CPU-ms/img",
                    rnd,
                    name,
                    row.throughput,
                    row.p99_ms,
                    rows[-1]["cpu_ms_per_image"],
                )
    finally:
        for srv in stacks.values():
            srv.stop()
        shutil.rmtree(work / "repository", ignore_errors=True)
    names = list(stacks)
    ratios = []
    for rnd in range(ROUNDS):
        pair = {r["stack"]: r["throughput"] for r in rows if r["round"] == rnd}
        if len(pair) == 2:
            ratios.append(pair[names[1]] / pair[names[0]])

    def med(name: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["stack"] == name]
        return median(values) if values else None

    return {
        "replicas": replicas,
        "concurrency": CONCURRENCY,
        "rounds": rows,
        "throughput_ratio": median(ratios) if ratios else None,
        "throughput_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "summary": {
            name: {
                "throughput": med(name, "throughput"),
                "p99_ms": med(name, "p99_ms"),
                "cpu_ms_per_image": med(name, "cpu_ms_per_image"),
            }
            for name in names
        },
    }
