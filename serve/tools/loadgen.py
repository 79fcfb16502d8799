"""The load loop for what perf_analyzer cannot drive: the in-process baselines (ONNX
Runtime, PyTorch, a bare TensorRT engine), so every Triton figure of a benchmark report
(measured by perf_analyzer, serve/tools/perf_analyzer.py) is a ratio to them in the same run.

``measure`` runs ``concurrency`` threads that each call ``run_once`` again as soon as it
returns; a level stops when 3 consecutive windows agree within 10% in throughput (the
stability rule perf_analyzer applies too, there to latency as well) or at a time cap,
and reports the latencies of the last 3 windows. Until perf_analyzer drove the bench,
this loop also drove the Triton rows through the Python client; the side-by-side of the
two on the same levels is in docs/benchmarks.md ("perf_analyzer vs the Python loop").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class Level:
    """One measured point of a benchmark (the rows of ``results`` in the report)."""

    backend: str  # triton-grpc | triton-grpc-shm | triton-http | onnxruntime | pytorch | ...
    input: str  # tensor | raw
    batch: int
    concurrency: int
    throughput: float = 0.0  # images/s
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    requests: int = 0
    stable: bool = False
    seconds: float = 0.0
    precision: str = "fp32"
    request_rate: float | None = None  # requests/s offered (request-rate runs)
    server: dict[str, float] = field(default_factory=dict)
    ratio_to_onnxruntime: float | None = None
    ratio_to_pytorch: float | None = None


@dataclass
class Measurement:
    """Raw outcome of :func:`measure`."""

    latencies_s: list[float]
    errors: int
    requests: int
    stable: bool
    seconds: float


def percentiles(lat_s: list[float]) -> dict[str, float]:
    """p50/p90/p95/p99 in milliseconds (zeros when nothing succeeded)."""
    if not lat_s:
        return {f"p{q}_ms": 0.0 for q in PERCENTILES}
    a = np.asarray(lat_s) * 1000
    return {f"p{q}_ms": float(np.percentile(a, q)) for q in PERCENTILES}


def measure(
    run_once: Callable[[Any], Any],
    concurrency: int,
    window: float = 2.0,
    max_seconds: float = 20.0,
) -> Measurement:
    """Closed loop with ``concurrency`` threads calling ``run_once(None)``."""
    lock = threading.Lock()
    records: list[tuple[float, float, bool]] = []  # (end time, latency, ok)
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                run_once(None)
                ok = True
            except Exception:  # noqa: BLE001 - counted as an error of this level
                ok = False
            t1 = time.perf_counter()
            with lock:
                records.append((t1, t1 - t0, ok))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    stop.wait(min(1.0, window))  # warm-up, not measured
    warm_end = time.perf_counter()
    windows: list[tuple[float, float]] = []
    stable = False
    while True:
        w0 = time.perf_counter()
        stop.wait(window)
        w1 = time.perf_counter()
        windows.append((w0, w1))
        with lock:
            counts = [sum(1 for e, _, ok in records if a <= e < b and ok) for a, b in windows]
        rates = [c / (b - a) for c, (a, b) in zip(counts, windows, strict=True)]
        if len(rates) >= 3:
            last = rates[-3:]
            mean = sum(last) / 3
            if mean > 0 and all(abs(r - mean) <= 0.1 * mean for r in last):
                stable = True
                break
        if w1 - warm_end >= max_seconds:
            break
    stop.set()
    for t in threads:
        t.join(30)
    a, b = windows[-3][0] if len(windows) >= 3 else windows[0][0], windows[-1][1]
    with lock:
        chosen = [(lat, ok) for e, lat, ok in records if a <= e < b]
    lat = [x for x, ok in chosen if ok]
    errors = sum(1 for _, ok in chosen if not ok)
    return Measurement(lat, errors, len(chosen), stable, b - a)


def level(
    backend: str, inp: str, batch: int, concurrency: int, m: Measurement, precision: str = "fp32"
) -> Level:
    """A report row from a measurement (``batch`` images per call)."""
    return Level(
        backend,
        inp,
        batch,
        concurrency,
        throughput=len(m.latencies_s) * batch / max(m.seconds, 1e-9),
        errors=m.errors,
        requests=m.requests,
        stable=m.stable,
        seconds=round(m.seconds, 2),
        precision=precision,
        **percentiles(m.latencies_s),  # type: ignore[arg-type]  # p50_ms .. p99_ms: floats
    )
