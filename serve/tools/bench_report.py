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


WHERE = {
    "triton": "served (front)",
    "front": "served (front)",
    "direct": "Triton direct",
}


def where(backend: str) -> str:
    """Where a row ran: through the public front, to Triton directly, or in-process."""
    return WHERE.get(backend.split("-", 1)[0], "in-process")


def title(report: dict[str, Any]) -> str:
    """Model, version, precision, machine: what a figure or table measured."""
    m = report["machine"]
    return (
        f"{report['model']} v{report.get('version', '?')} ({report['arch']}, "
        f"{report.get('precision', 'fp32').upper()}) on {m['cpu']}, {m['cores']} cores, "
        f"{str(report.get('date', ''))[:10]}"
    )


def failed(r: dict[str, Any]) -> bool:
    """A level that did not pass: errors, or a stall (p99 over 5x p50)."""
    return bool(r.get("errors")) or bool((r.get("server") or {}).get("stall"))


MARKERS = "osD^v<>Ph*Xd"


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput against p99 latency: a line per backend x input (closed loop: labels are
    the concurrency; open loop dashed, labels the request rate), distinct markers, the
    in-process baselines as stars, failed levels (errors, stalls) crossed out in red."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(11, 6))
    groups: dict[tuple[str, str, str, bool], list[dict]] = {}
    for r in report["results"]:
        key = (r["backend"], r["input"], r.get("precision", ""), bool(r.get("request_rate")))
        groups.setdefault(key, []).append(r)
    for n, ((backend, kind, precision, open_loop), rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda r: (r["concurrency"], r.get("request_rate") or 0))
        xs, ys = [r["p99_ms"] for r in rows], [r["throughput"] for r in rows]
        served = where(backend) != "in-process"
        label = f"{backend} {kind} {precision.upper()}, {where(backend)}"
        if open_loop:
            label += ", Poisson arrivals"
        if served:
            style = "--" if open_loop else "-"
            color = plt.get_cmap("tab20")(n % 20)
            ax.plot(xs, ys, style, marker=MARKERS[n % len(MARKERS)], ms=5, color=color, label=label)
            for r in rows:
                ax.annotate(
                    f"{r['request_rate']:g}/s" if open_loop else f"c{r['concurrency']}",
                    (r["p99_ms"], r["throughput"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        else:
            ax.plot(xs, ys, "*", ms=12, label=label)
        bad = [r for r in rows if failed(r)]
        if bad:
            ax.plot(
                [r["p99_ms"] for r in bad],
                [r["throughput"] for r in bad],
                "x",
                color="red",
                ms=11,
                mew=2,
            )
    ax.plot([], [], "x", color="red", ms=9, mew=2, label="failed: errors or a stall")
    ax.set(
        xscale="log",
        xlabel="p99 latency (ms, log)",
        ylabel="throughput (images/s)",
        title=title(report) + "\nlabels: concurrency (c) or request rate (/s)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def markdown_table(report: dict[str, Any], concurrency: tuple[int, ...] = (1, 4, 16)) -> str:
    """The docs' table from a bench JSON: the in-process baselines, then every served row
    at the given concurrency levels and every request-rate row. ``x ORT`` is the ratio to
    in-process ONNX Runtime measured just before and after the row's group (their range
    in brackets); ``CPU ms/img`` the serving processes' CPU time per image (front,
    tritonserver, stubs), ``x ORT CPU`` its ratio to in-process ONNX Runtime's own."""
    head = (
        "| backend | where | precision | input | load | img/s | p50 ms | p99 ms | errors "
        "| x ORT (range) | CPU ms/img | x ORT CPU | queue ms | compute ms | avg batch |\n"
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |"
    )
    ort = next(r for r in report["results"] if r["backend"] == "onnxruntime")
    lines = [head]
    for r in report["results"]:
        served = where(r["backend"]) != "in-process"
        rate = r.get("request_rate")
        if served and not rate and r["concurrency"] not in concurrency:
            continue
        load = f"{rate:g} req/s" if rate else f"c={r['concurrency']}"
        name = r["backend"].replace("pytorch", "pytorch eager")
        srv = r.get("server") or {}
        ratio = r.get("ratio_to_onnxruntime") or r["throughput"] / ort["throughput"]
        spread = f"{ratio:.2f}"
        if "ratio_min" in srv:
            spread += f" ({srv['ratio_min']:.2f}-{srv['ratio_max']:.2f})"
        if rate:  # an offered rate, not a capacity: no ratio
            spread = ""
        cpu = f"{srv['cpu_ms_per_image']:.1f}" if srv.get("cpu_ms_per_image") else ""
        cpu_ratio = (
            f"{srv['cpu_ratio_to_onnxruntime']:.2f}" if srv.get("cpu_ratio_to_onnxruntime") else ""
        )
        extra = (
            f"{srv.get('queue_ms', srv.get('avg_queue_ms', 0)):.1f} | "
            f"{srv.get('compute_infer_ms', srv.get('avg_compute_ms', 0)):.1f} | "
            f"{srv.get('avg_executed_batch', 0):.2f}"
            if served
            else " |  | "
        )
        mark = " FAILED" if failed(r) else ""
        lines.append(
            f"| {name}{mark} | {where(r['backend'])} | {r.get('precision', '').upper()} | "
            f"{r['input']} | {load} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {spread} | {cpu} | {cpu_ratio} | "
            f"{extra} |"
        )
    return f"{title(report)}\n\n" + "\n".join(lines)


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
