"""Benchmark reports: ``bench/<model>-<date>.json`` + ``-latest.json``, a PNG of
throughput against p99 latency, and the markdown table of docs/benchmarks.md (torch-free)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from serve.core.files import atomic_write_json


def write_report(report: dict[str, Any], out: Path, model: str) -> list[Path]:
    """Write the dated and the latest JSON and the PNG; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = [atomic_write_json(out / f"{model}-{stamp}.json", report)]
    paths.append(atomic_write_json(out / f"{model}-latest.json", report))
    plot(report, out / f"{model}-latest.png")
    paths.append(out / f"{model}-latest.png")
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
