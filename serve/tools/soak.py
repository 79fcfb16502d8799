"""``python -m serve soak`` (``make soak``): sustained mixed load with failure and memory
accounting.

``--concurrency`` closed-loop clients, alternating gRPC/HTTP and tensor/raw-image input
(every other gRPC tensor client with its pixels in shared memory, for a local server),
run for ``--seconds`` against a server started on free ports (or ``--url``). Every
failure is counted with its message; the resident memory of tritonserver and its
python-backend stubs is sampled every second. Passes with 0 failed requests and RSS
growth after warm-up within ``--max-rss-growth-mib``. Writes bench/local/soak-latest.json.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from serve.backend.errors import UsageError
from serve.client.client import Classifier
from serve.core.files import atomic_write_json
from serve.core.flags import Flag, add_flags, build
from serve.core.names import image_model_name
from serve.tools.bench_inputs import bench_inputs
from serve.tools.proc_stats import tree_rss


def run_soak(
    server_pid: int | None,
    grpc_url: str,
    http_url: str,
    model: str,
    pixels: np.ndarray,
    raw: np.ndarray,
    seconds: float,
    concurrency: int,
    warmup: float | None = None,
    shared_memory: bool = True,
) -> dict[str, Any]:
    """The load itself; returns counts, failures and the RSS series. RSS growth is judged
    after ``warmup`` seconds (default: the first third of the run), when allocators and
    thread pools have reached their steady state; a leak keeps growing after that."""
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}
    per_transport: dict[str, int] = {}  # "grpc-shm/tensor" -> successful requests
    failures: list[str] = []

    def client(i: int) -> None:
        protocol = ("grpc", "http")[i % 2]
        kind = ("tensor", "raw")[(i // 2) % 2]
        # every other gRPC tensor client sends its pixels through shared memory
        shm = shared_memory and protocol == "grpc" and kind == "tensor" and i // 4 % 2
        url = grpc_url if protocol == "grpc" else http_url
        name = model if kind == "tensor" else image_model_name(model)
        data = pixels if kind == "tensor" else raw
        label = f"{protocol}{'-shm' if shm else ''}/{kind}"
        with Classifier(url, name, protocol=protocol, shared_memory=bool(shm)) as clf:
            j = 0
            while not stop.is_set():
                try:
                    clf.logits(data[j % len(data)][None])
                    with lock:
                        counts["ok"] += 1
                        per_transport[label] = per_transport.get(label, 0) + 1
                except Exception as e:  # noqa: BLE001 - every failure is recorded
                    with lock:
                        counts["failed"] += 1
                        failures.append(f"{label}: {e}"[:300])
                j += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    rss: list[tuple[float, int]] = []
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        if server_pid:
            rss.append((round(time.monotonic() - t0, 1), tree_rss(server_pid)))
    stop.set()
    for t in threads:
        t.join(60)
    warmup = seconds / 3 if warmup is None else min(warmup, seconds / 3)
    after_warmup = [r for s, r in rss if s >= warmup] or [0]
    after_10s = [r for s, r in rss if s >= min(10.0, warmup)] or [0]
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        **counts,
        "ok_by_transport": dict(sorted(per_transport.items())),
        "requests_per_s": counts["ok"] / seconds,
        "failures": failures[:20],
        "rss_mib_start": after_warmup[0] / 2**20,
        "rss_mib_max": max(after_warmup) / 2**20,
        "rss_growth_mib": (max(after_warmup) - after_warmup[0]) / 2**20,
        "warmup_seconds": warmup,
        "rss_growth_after_10s_mib": (max(after_10s) - after_10s[0]) / 2**20,
        "rss_series_mib": [(s, round(r / 2**20, 1)) for s, r in rss],
    }


Allocator = Literal["both", "jemalloc", "glibc"]
ALLOCATORS: tuple[str, ...] = get_args(Allocator)


@dataclass(frozen=True)
class SoakConfig:
    """What ``python -m serve soak`` loads, for how long, and its pass bounds."""

    model: str = "antsbees"
    model_repository: str = "model_repository"
    data: str = ""  # required on the command line
    seconds: float = 300
    concurrency: int = 16
    max_rss_growth_mib: float = 128.0
    allocator: Allocator = "both"
    shared_memory: bool = True
    warmup: float | None = None
    out: str = "bench/local"


SOAK_FLAGS = [
    Flag("model", "--model", "the classifier loaded; raw-image clients use <model>_image"),
    Flag("model_repository", "--model-repository", "Triton model repository"),
    Flag(
        "data",
        "--data",
        "ImageFolder split with images to send (.../val)",
        {"required": True},
    ),
    Flag("seconds", "--seconds", "per allocator"),
    Flag("concurrency", "--concurrency", "closed-loop clients (mixed gRPC/HTTP, tensor/raw)"),
    Flag(
        "max_rss_growth_mib",
        "--max-rss-growth-mib",
        "pass bound: RSS growth (MiB) of tritonserver and its stubs after the warm-up",
    ),
    Flag(
        "allocator",
        "--allocator",
        "tritonserver's malloc: jemalloc (LD_PRELOAD), glibc, or both one after the "
        "other to compare their RSS growth (default; glibc only when jemalloc is missing)",
    ),
    Flag(
        "shared_memory",
        "--shared-memory",
        "every other gRPC tensor client sends pixels through system shared memory",
    ),
    Flag(
        "warmup",
        "--warmup",
        "seconds before RSS growth is judged (default: a third of --seconds)",
    ),
    Flag("out", "--out", "folder of soak-latest.json and .png and the server logs"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, SoakConfig, SOAK_FLAGS)


def allocators_to_run(choice: Allocator) -> list[str]:
    """The allocators a soak runs, jemalloc first; ``both`` without jemalloc installed
    runs glibc alone and says so. Asking for jemalloc without it is an error."""
    from serve.runtime.install import find_jemalloc

    if choice == "both":
        if find_jemalloc() is None:
            print("soak: libjemalloc.so.2 not installed (apt-get install libjemalloc2): glibc only")
            return ["glibc"]
        return ["jemalloc", "glibc"]
    if choice == "jemalloc" and find_jemalloc() is None:
        raise UsageError("--allocator jemalloc: libjemalloc.so.2 is not installed (libjemalloc2)")
    return [choice]


def plot_rss(results: dict[str, dict[str, Any]], path: Path) -> None:
    """RSS of tritonserver + stubs over the run, one line per allocator."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        series = r["rss_series_mib"]
        ax.plot([s for s, _ in series], [m for _, m in series], label=(
            f"{name}: growth {r['rss_growth_mib']:.1f} MiB after {r['warmup_seconds']:.0f} s, "
            f"{r['requests_per_s']:.0f} req/s"
        ))  # fmt: skip
        ax.axvline(r["warmup_seconds"], color="grey", lw=0.5, ls="--")
    ax.set(xlabel="seconds", ylabel="RSS MiB (tritonserver + stubs)", title="soak: server memory")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def run(a: argparse.Namespace) -> int:
    """``python -m serve soak``: :func:`soak` on the config the flags describe."""
    return soak(build(SoakConfig, a, SOAK_FLAGS))


def soak(cfg: SoakConfig) -> int:
    """One soak per allocator, each on its own fresh server; 0 when every one passed."""
    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.triton_server import TritonServer

    repo = Path(cfg.model_repository)
    inputs = bench_inputs(repo, cfg.model, cfg.data, 32)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for allocator in allocators_to_run(cfg.allocator):
        opts = ServerOptions(
            model_repository=str(repo),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            jemalloc=allocator == "jemalloc",
        )
        with TritonServer(opts, log_path=out / f"soak-server-{allocator}.log") as srv:
            r = run_soak(
                srv.pid,
                srv.grpc_url,
                srv.http_url,
                cfg.model,
                inputs.pixels,
                inputs.raw,
                cfg.seconds,
                cfg.concurrency,
                warmup=cfg.warmup,
                shared_memory=cfg.shared_memory,
            )
            r["server_ready_after"] = srv.is_ready()
        r["passed"] = (
            r["failed"] == 0
            and r["server_ready_after"]
            and r["rss_growth_mib"] <= cfg.max_rss_growth_mib
        )
        results[allocator] = r
        print(
            f"soak [{allocator}] {cfg.seconds:.0f}s x{cfg.concurrency}: {r['ok']} ok, "
            f"{r['failed']} failed, {r['requests_per_s']:.1f} req/s; "
            f"RSS {r['rss_mib_start']:.0f} -> "
            f"max {r['rss_mib_max']:.0f} MiB after {r['warmup_seconds']:.0f} s warm-up "
            f"(growth {r['rss_growth_mib']:.1f}, bound {cfg.max_rss_growth_mib:.0f}; "
            f"{r['rss_growth_after_10s_mib']:.1f} counted from 10 s): "
            f"{'PASSED' if r['passed'] else 'FAILED'}"
        )
    # the top level is the allocator serve run uses by default (jemalloc when installed)
    report = {
        **next(iter(results.values())),
        "allocator": next(iter(results)),
        "by_allocator": results,
        "max_rss_growth_mib": cfg.max_rss_growth_mib,
        "passed": all(r["passed"] for r in results.values()),
    }
    atomic_write_json(out / "soak-latest.json", report)
    plot_rss(results, out / "soak-latest.png")
    if len(results) == 2:
        j, g = results["jemalloc"], results["glibc"]
        print(
            f"soak: RSS growth jemalloc {j['rss_growth_mib']:.1f} MiB vs glibc "
            f"{g['rss_growth_mib']:.1f} MiB; "
            f"peak {j['rss_mib_max']:.0f} vs {g['rss_mib_max']:.0f} MiB"
        )
    print(f"soak: {out / 'soak-latest.json'}, {out / 'soak-latest.png'}")
    return 0 if report["passed"] else 1
