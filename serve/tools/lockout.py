"""``make bench``'s lockout figure (torch-free): what a normal client sees while strangers
without a key try to lock it out of the bench's own ``serve run`` stack.

Phases, each ``seconds`` long after the attack is under way (serve/tools/attack.py):
idle; N slow senders (N = 4, 16, 64 addresses, each in a network of its own, 4 requests
each); 3 clients sending the hostile image corpus; ``silent`` silent connections from
other addresses. The normal client sends what the attack aims at - tensors over gRPC on
one connection (slow senders), raw images to ``<model>_image`` (hostile images), a new
HTTP connection per request (silent connections) - and each phase is judged against
the same client's idle run: success >= 99% and p99 <= 3x the idle p99.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from serve.core.names import IMAGE_INPUT, INPUT_NAME, image_model_name
from serve.tools.attack import ClientRun, normal_client

log = logging.getLogger(__name__)

SLOW_SENDER_ADDRESSES = (4, 16, 64)
SUCCESS_TARGET = 0.99
P99_TARGET = 3.0  # x the same client's idle p99
SETTLE_S = 3.0  # the attack under way before the normal client is measured
SILENT_PER_PROCESS = 9_000  # sockets one attacking process holds (its descriptor limit)


@contextlib.contextmanager
def attacking(*argvs: list[str]) -> Iterator[list[dict]]:
    """Each ``python -m serve.tools.attack ARGV`` in a process of its own (the measured
    client shares no interpreter, GIL or descriptor table with them), under way before
    the block; stopped after it, their JSON summaries in the yielded list."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "serve.tools.attack", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for argv in argvs
    ]
    summaries: list[dict] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"an attacker did not start ({line!r})")
        time.sleep(SETTLE_S)
        yield summaries
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            with contextlib.suppress(ValueError, IndexError):
                summaries.append(json.loads(out.strip().splitlines()[-1]))


def _tensor_call(url: str, model: str, pixels: np.ndarray) -> tuple[Callable[[], object], Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    return (lambda: client.infer(model, [inp], client_timeout=30)), client


def _image_call(url: str, model: str, image: bytes) -> tuple[Callable[[], object], Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput(IMAGE_INPUT, [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[image]], dtype=object))
    return (lambda: client.infer(image_model_name(model), [inp], client_timeout=30)), client


def _new_connection_call(url: str, model: str, pixels: np.ndarray) -> Callable[[], object]:
    import tritonclient.http as httpclient

    def call() -> object:
        client = httpclient.InferenceServerClient(url, connection_timeout=30, network_timeout=30)
        try:
            inp = httpclient.InferInput(INPUT_NAME, list(pixels.shape), "FP32")
            inp.set_data_from_numpy(pixels)
            return client.infer(model, [inp])
        finally:
            client.close()

    return call


def _row(phase: str, client: str, run: ClientRun, idle: ClientRun | None, **extra: Any) -> dict:
    p99 = run.percentile(99)
    row = {
        "phase": phase,
        "client": client,
        "requests": run.ok + run.failed,
        "success": run.success,
        "p50_ms": run.percentile(50),
        "p99_ms": p99,
        "max_ms": max(run.latencies_ms, default=float("nan")),
        "errors": run.errors[:3],
        **extra,
    }
    if idle is not None:
        row["idle_p99_ms"] = idle.percentile(99)
        row["p99_ratio"] = p99 / idle.percentile(99)
        row["passed"] = run.success >= SUCCESS_TARGET and row["p99_ratio"] <= P99_TARGET
    log.info(
        "lockout %-18s %-16s %5d requests  success %6.2f%%  p50 %6.1f  p99 %6.1f ms%s",
        phase,
        client,
        row["requests"],
        100 * run.success,
        row["p50_ms"],
        p99,
        f"  x{row['p99_ratio']:.2f} idle p99" if idle is not None else "",
    )
    return row


def measure(
    srv: Any, model: str, pixels: np.ndarray, image: bytes, seconds: float, silent: int = 20_000
) -> dict[str, Any]:
    """Every phase against ``srv`` (a :class:`~serve.runtime.stack.PublicServer`); the
    attackers run in processes of their own (serve/tools/attack.py)."""
    tensor, tensor_client = _tensor_call(srv.grpc_url, model, pixels)
    raw, image_client = _image_call(srv.grpc_url, model, image)
    fresh = _new_connection_call(srv.http_url, model, pixels)
    shape = ",".join(str(d) for d in pixels.shape)
    rows: list[dict] = []
    try:
        for call in (tensor, raw, fresh):  # warm the paths
            call()
        idle = {
            "grpc tensor": normal_client(tensor, seconds),
            "grpc raw image": normal_client(raw, seconds),
            "new http conn": normal_client(fresh, seconds),
        }
        rows += [_row("idle", name, run, None) for name, run in idle.items()]
        for n in SLOW_SENDER_ADDRESSES:
            argv = ["slow", "--http", srv.http_url, "--grpc", srv.grpc_url, "--model", model]
            argv += ["--shape", shape, "--addresses", str(n), "--per-address", "4"]
            with attacking(argv) as summaries:
                run = normal_client(tensor, seconds)
            extra = {"attackers": n, **(summaries[0] if summaries else {})}
            rows.append(
                _row(f"slow senders x{n}", "grpc tensor", run, idle["grpc tensor"], **extra)
            )
        argv = ["images", "--grpc", srv.grpc_url, "--model", model, "--clients", "3"]
        with attacking(argv) as summaries:
            run = normal_client(raw, seconds)
        outcomes = summaries[0] if summaries else {}
        rows.append(
            _row("hostile images x3", "grpc raw image", run, idle["grpc raw image"], **outcomes)
        )
        procs = -(-silent // SILENT_PER_PROCESS)
        argvs = [
            ["silent", "--url", srv.http_url, "--addresses", "20", "--total"]
            + [str(silent // procs), "--first-network", str(100 + 20 * k)]
            for k in range(procs)
        ]
        with attacking(*argvs) as summaries:
            run = normal_client(fresh, seconds)
        opened = sum(int(x.get("opened", 0)) for x in summaries)
        held = sum(int(x.get("held_max", 0)) for x in summaries)
        rows.append(
            _row(
                f"silent conns {silent}",
                "new http conn",
                run,
                idle["new http conn"],
                opened=opened,
                held_max=held,
            )
        )
    finally:
        tensor_client.close()
        image_client.close()
    judged = [r for r in rows if "passed" in r]
    return {
        "targets": {"success": SUCCESS_TARGET, "p99_vs_idle": P99_TARGET},
        "seconds_per_phase": seconds,
        "phases": rows,
        "passed": all(r["passed"] for r in judged),
    }


def plot(lockout: dict[str, Any], title: str, path: Path) -> None:
    """p99 per phase against 3x the idle p99 (pass/fail marked), success rates beside."""
    from serve.core.plots import plt, save_figure

    rows = [r for r in lockout["phases"] if "passed" in r]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = np.arange(len(rows))
    colors = ["tab:green" if r["passed"] else "tab:red" for r in rows]
    ax.bar(xs, [r["p99_ms"] for r in rows], color=colors, label="p99 under attack")
    ax.scatter(
        xs,
        [P99_TARGET * r["idle_p99_ms"] for r in rows],
        marker="_",
        s=900,
        color="black",
        label=f"target: {P99_TARGET:g}x idle p99",
    )
    for x, r in zip(xs, rows, strict=True):
        mark = "pass" if r["passed"] else "FAIL"
        ax.annotate(
            f"{mark}\n{100 * r['success']:.1f}% ok",
            (x, r["p99_ms"]),
            ha="center",
            fontsize=8,
            textcoords="offset points",
            xytext=(0, 3),
        )
    ax.set_xticks(xs, [f"{r['phase']}\n({r['client']})" for r in rows], fontsize=8)
    ax.set(ylabel="normal client's p99 (ms)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
