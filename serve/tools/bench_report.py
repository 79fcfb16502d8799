"""Benchmark reports: ``bench/<model>-<date>.json`` + ``-latest.json``, a PNG of
throughput against p99 latency, and the markdown table of docs/benchmarks.md (torch-free)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from serve.core.files import atomic_write_json
from serve.tools.loadgen import Level

log = logging.getLogger(__name__)


def write_report(report: dict[str, Any], out: Path, model: str) -> list[Path]:
    """Write the dated and the latest JSON and the PNG; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = [atomic_write_json(out / f"{model}-{stamp}.json", report)]
    paths.append(atomic_write_json(out / f"{model}-latest.json", report))
    plot(report, out / f"{model}-latest.png")
    paths.append(out / f"{model}-latest.png")
    if "lockout" in report:
        from serve.tools.lockout import plot as plot_lockout

        title = (
            f"{model}: a normal client while strangers try to lock it out "
            f"({report['machine']['cpu']}, {report['machine']['cores']} cores)"
        )
        plot_lockout(report["lockout"], title, out / f"{model}-lockout-latest.png")
        paths.append(out / f"{model}-lockout-latest.png")
    return paths


def plot(report: dict[str, Any], path: Path) -> None:
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(9, 5))
    groups: dict[tuple[str, str, bool], list[dict]] = {}
    for r in report["results"]:
        groups.setdefault((r["backend"], r["input"], bool(r.get("request_rate"))), []).append(r)
    for (backend, kind, open_loop), rows in groups.items():
        rows = sorted(rows, key=lambda r: (r["concurrency"], r.get("request_rate") or 0))
        xs, ys = [r["p99_ms"] for r in rows], [r["throughput"] for r in rows]
        style = ("s--" if open_loop else "o-") if backend.startswith("triton") else "*"
        label = f"{backend} ({kind}{', Poisson rate' if open_loop else ''})"
        ax.plot(xs, ys, style, ms=8 if style == "*" else 4, label=label)
        if backend.startswith("triton"):
            for r in rows:
                ax.annotate(
                    f"{r['request_rate']:g}/s" if open_loop else str(r["concurrency"]),
                    (r["p99_ms"], r["throughput"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    ax.set(
        xscale="log",
        xlabel="p99 latency (ms, log)",
        ylabel="throughput (images/s)",
        title=f"{report['model']} ({report['arch']}) on {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores; labels = concurrency or request rate",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown_table(report: dict[str, Any], concurrency: tuple[int, ...] = (1, 4, 16)) -> str:
    """The docs' table from a bench JSON: the in-process baselines, then every Triton
    row at the given concurrency levels and every request-rate row."""
    head = (
        "| backend | input | load | img/s | p50 ms | p99 ms | errors | x ORT "
        "| queue ms | compute ms | avg batch |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    ort = next(r for r in report["results"] if r["backend"] == "onnxruntime")
    lines = [head]
    for r in report["results"]:
        triton = r["backend"].startswith("triton")
        rate = r.get("request_rate")
        if triton and not rate and r["concurrency"] not in concurrency:
            continue
        load = f"{rate:g} req/s" if rate else f"c={r['concurrency']}"
        name = r["backend"] if triton else f"{r['backend']} in-process"
        name = name.replace("pytorch", "pytorch eager")
        ratio = r.get("ratio_to_onnxruntime") or r["throughput"] / ort["throughput"]
        srv = r.get("server") or {}
        extra = (
            f"{srv.get('avg_queue_ms', 0):.1f} | {srv.get('avg_compute_ms', 0):.1f} | "
            f"{srv.get('avg_executed_batch', 0):.2f}"
            if triton
            else " |  | "
        )
        lines.append(
            f"| {name} | {r['input']} | {load} | {r['throughput']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {ratio:.2f} | {extra} |"
        )
    return "\n".join(lines)


FRONT_AB_ROUNDS = 2  # front / direct measured in turn this many times per level
STALL_P99_OVER_P50 = 5.0  # a level whose p99 is over 5x its p50 is flagged as a stall


def mark_levels(levels: list[Level], image_pipeline: float | None) -> None:
    """Per level: the raw-image ratio to the in-process image pipeline, and the stall flag
    (p99 over ``STALL_P99_OVER_P50`` x p50; closed-loop levels only)."""
    for lv in levels:
        if lv.input == "raw" and image_pipeline:
            lv.server["ratio_to_image_pipeline"] = lv.throughput / image_pipeline
        if not lv.request_rate and lv.p50_ms > 0:
            lv.server["stall"] = float(lv.p99_ms > STALL_P99_OVER_P50 * lv.p50_ms)
            if lv.server["stall"]:
                log.warning(
                    "%s %s c=%d: p99 %.1f ms is over %gx its p50 %.1f ms (a stall)",
                    lv.backend,
                    lv.input,
                    lv.concurrency,
                    lv.p99_ms,
                    STALL_P99_OVER_P50,
                    lv.p50_ms,
                )


def front_cost(front: list[Level], direct: list[Level]) -> list[dict[str, Any]]:
    """Per level measured both ways (``front-*`` and ``direct-*`` rows, possibly several
    rounds each): throughput ratio (front / direct, of the means) and the p50 and p99 the
    front adds (ms, difference of the means)."""

    def groups(levels: list[Level]) -> dict[tuple[str, str, int], list[Level]]:
        out: dict[tuple[str, str, int], list[Level]] = {}
        for lv in levels:
            if not lv.request_rate and lv.throughput:
                key = (lv.backend.split("-", 1)[1], lv.input, lv.concurrency)
                out.setdefault(key, []).append(lv)
        return out

    def mean(levels: list[Level], field: str) -> float:
        return sum(getattr(lv, field) for lv in levels) / len(levels)

    by_key = groups(direct)
    rows = []
    for key, fronts in groups(front).items():
        directs = by_key.get(key)
        if not directs:
            continue
        protocol, kind, concurrency = key
        rows.append(
            {
                "protocol": protocol,
                "kind": kind,
                "concurrency": concurrency,
                "rounds": min(len(fronts), len(directs)),
                "throughput_ratio": mean(fronts, "throughput") / mean(directs, "throughput"),
                "p50_added_ms": mean(fronts, "p50_ms") - mean(directs, "p50_ms"),
                "p99_added_ms": mean(fronts, "p99_ms") - mean(directs, "p99_ms"),
            }
        )
    return rows
