"""The Triton rows of ``make bench`` (torch-free): perf_analyzer (serve/tools/perf_analyzer.py)
at every protocol x input x load level against one server, each run's CSV turned into a
report row with Triton's statistics (deltas: average batch, errors) and its ratio to the
in-process ONNX Runtime baseline. The sweep around it is serve/tools/bench.py."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from serve.core import auth
from serve.core.names import image_model_name
from serve.tools import perf_analyzer as pa
from serve.tools import perf_analyzer_install as pa_install
from serve.tools import perf_analyzer_profile as pa_profile
from serve.tools.bench_config import BenchConfig, Distribution
from serve.tools.bench_inputs import BenchInputs, write_input_data
from serve.tools.bench_server import _delta, _server_stats, admin_key
from serve.tools.loadgen import Level
from serve.tools.proc_stats import cpu_seconds, descendants

log = logging.getLogger(__name__)

Combo = tuple[str, str, int, float]  # protocol, input kind, concurrency, request rate


@dataclass
class PaSettings:
    """How perf_analyzer measures every Triton level (its own stability rule: 3
    consecutive windows within ``stability_percentage`` in throughput and latency)."""

    measurement_interval_ms: int = 1000
    measurement_mode: str = "time_windows"
    stability_percentage: float = 10.0
    max_trials: int = 8
    distribution: Distribution = "poisson"

    @classmethod
    def from_config(cls, cfg: BenchConfig) -> PaSettings:
        return cls(
            measurement_interval_ms=int(cfg.window * 1000),
            stability_percentage=cfg.stability,
            max_trials=cfg.max_trials,
            distribution=cfg.distribution,
        )


def loads(cfg: BenchConfig) -> list[tuple[int, float]]:
    """The load levels: the concurrency sweep, then the request rates."""
    return [(c, 0.0) for c in cfg.concurrency] + [(0, r) for r in cfg.request_rate]


def all_combos(cfg: BenchConfig) -> list[Combo]:
    """Every protocol x input x load level of ``cfg`` (shared memory: tensors only)."""
    return [
        (protocol, kind, conc, rate)
        for protocol in cfg.protocols
        for kind in cfg.inputs
        if not (protocol == "grpc-shm" and kind == "raw")  # shm carries pixel tensors
        for conc, rate in loads(cfg)
    ]


def _profile(
    srv: Any,
    settings: PaSettings,
    target: str,
    combo: Combo,
    batch: int,
    data: str,
    direct: bool = False,
) -> pa_profile.Profile:
    """The perf_analyzer run of one level against ``target`` on ``srv``: through the
    front's owner listener (``direct``: Triton itself), inside the server's namespaces,
    with no key in its argv."""
    protocol, _, conc, rate = combo
    wire, shm = ("grpc", "system") if protocol == "grpc-shm" else (protocol, "none")
    url, netns_pid = srv.perf_url(wire, direct)
    return pa_profile.Profile(
        model=target,
        url=url,
        netns_pid=netns_pid,
        protocol=wire,
        batch=batch,
        concurrency=conc,
        request_rate=rate,
        distribution=settings.distribution,
        shared_memory=shm,
        input_data=data,
        measurement_interval_ms=settings.measurement_interval_ms,
        measurement_mode=settings.measurement_mode,
        stability_percentage=settings.stability_percentage,
        max_trials=settings.max_trials,
    )


def _log_level(lv: Level, kind: str, conc: int, rate: float) -> None:
    log.info(
        "%-15s %-6s %-9s %7.1f img/s  p50 %7.1f  p99 %7.1f ms  x%.2f ORT  errors %d%s",
        lv.backend,
        kind,
        f"r={rate:g}/s" if rate else f"c={conc}",
        lv.throughput,
        lv.p50_ms,
        lv.p99_ms,
        lv.ratio_to_onnxruntime or 0,
        lv.errors,
        "" if lv.stable else "  (not stable within max trials)",
    )


def triton_levels(
    srv: Any,
    cfg: BenchConfig,
    inputs: BenchInputs,
    baseline: Level | None,
    skipped: dict[str, str] | None = None,
    prefix: str = "triton",
    combos: Sequence[Combo] | None = None,
    direct: bool = False,
) -> list[Level]:
    """perf_analyzer over ``cfg.protocols`` x ``cfg.inputs`` x (concurrency levels, then
    request rates with ``--distribution`` arrivals) against ``srv``; one row per level.
    A level without any stable measurement goes into ``skipped`` with the reason."""
    import tritonclient.grpc as grpcclient

    model, batch = cfg.model, cfg.batch
    settings = PaSettings.from_config(cfg)
    headers = auth.headers(admin_key(srv)) or {}  # the statistics, read here (no argv)
    work = Path(cfg.out) / ".perf_analyzer"
    data = write_input_data(inputs, model, work)
    stats_client = grpcclient.InferenceServerClient(srv.grpc_url)
    levels: list[Level] = []
    skipped = {} if skipped is None else skipped
    combos = combos or all_combos(cfg)
    try:
        for combo in tqdm(combos, desc="perf_analyzer", unit="level"):
            protocol, kind, conc, rate = combo
            target = model if kind == "tensor" else image_model_name(model)
            profile = _profile(srv, settings, target, combo, batch, str(data[kind]), direct)
            procs = serving_processes(srv)
            before = _server_stats(stats_client, [model, target], headers)
            cpu0 = cpu_seconds(procs)
            try:
                result = pa.run(profile, work / "level.csv")
            except pa.Unstable as e:
                load = f"r={rate:g}" if rate else f"c={conc}"
                skipped[f"{prefix}-{protocol} {kind} {load}"] = str(e)
                log.warning("%s-%s %s %s: %s", prefix, protocol, kind, load, e)
                continue
            cpu = cpu_seconds(procs) - cpu0
            after = _server_stats(stats_client, [model, target], headers)
            lv = level_from_row(result, f"{prefix}-{protocol}", kind, batch, inputs.card.precision)
            lv.server.update(_delta(before, after))
            lv.errors = int(after["fail"] - before["fail"])
            images = after["inferences"] - before["inferences"]
            if procs and images > 0:
                lv.server["cpu_ms_per_image"] = 1000 * cpu / images
            if baseline is not None:
                compare_to(lv, [baseline])
            levels.append(lv)
            _log_level(lv, kind, conc, rate)
    finally:
        stats_client.close()
    return levels


def serving_processes(srv: Any) -> list[int]:
    """The processes that serve (the front, the tritonservers, their python-backend stubs
    and decoders): the stack's process tree; none for a server started elsewhere."""
    process = getattr(srv, "process", None)
    return descendants(process.pid) if process is not None else []


def compare_to(lv: Level, baselines: list[Level]) -> None:
    """``lv``'s ratios to in-process ONNX Runtime measured around it (before and after):
    throughput to their mean with the range over them, CPU time per image likewise."""
    speeds = [b.throughput for b in baselines if b.throughput > 0]
    if speeds:
        lv.ratio_to_onnxruntime = lv.throughput * len(speeds) / sum(speeds)
        lv.server["ratio_min"] = lv.throughput / max(speeds)
        lv.server["ratio_max"] = lv.throughput / min(speeds)
    costs = [b.server["cpu_ms_per_image"] for b in baselines if b.server.get("cpu_ms_per_image")]
    if costs and lv.server.get("cpu_ms_per_image"):
        lv.server["cpu_ratio_to_onnxruntime"] = (
            lv.server["cpu_ms_per_image"] * len(costs) / sum(costs)
        )


def level_from_row(
    result: pa_profile.Result, backend: str, kind: str, batch: int, precision: str
) -> Level:
    """A report row from perf_analyzer's (single-level) CSV."""
    row = result.rows[-1]
    return Level(
        backend,
        kind,
        batch,
        row.concurrency,
        throughput=row.throughput,
        p50_ms=row.p50_ms,
        p90_ms=row.p90_ms,
        p95_ms=row.p95_ms,
        p99_ms=row.p99_ms,
        stable=result.stable,
        precision=precision,
        request_rate=row.request_rate,
        server={
            "avg_queue_ms": row.server_queue_ms,
            "avg_compute_ms": row.server_compute_ms,
        },
    )


def load_generator(cfg: BenchConfig) -> dict[str, Any]:
    """The report's ``load_generator``: the tool, its version and how it measured."""
    return {
        "tool": "perf_analyzer",
        "version": pa_install.version(),
        "source": f"tritonclient {pa_install.VERSION} wheel (bin/perf_analyzer)",
        "settings": asdict(PaSettings.from_config(cfg)),
        "in_process": "serve.tools.loadgen: closed loop, 3 windows within 10% (the baselines)",
    }
