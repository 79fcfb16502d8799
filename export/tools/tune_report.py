"""The ``make tune`` report: the JSON of every trial with the winner under the p99 budget,
its PNG (throughput against p99 per candidate) and the table in docs/benchmarks.md."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from export.tools.tune_config import TuneConfig
from export.tools.tune_trials import Trial
from serve.core.machine import machine_info
from serve.tools import perf_analyzer as pa


def report(cfg: TuneConfig, trials: list[Trial], facts: dict[str, Any]) -> dict:
    """The tune JSON: every trial, the winner under the budget and the current config."""
    budget = cfg.p99_ms
    current = max((t for t in trials if t.is_current), key=lambda t: t.score(budget))
    best = max(trials, key=lambda t: (t.score(budget), t.is_current))
    # a change must beat the current config by more than the noise to be published
    winner = best if best.score(budget) > current.score(budget) * cfg.min_gain else current
    base = current.score(budget)
    gain = winner.score(budget) / base if base else None
    best_gain = best.score(budget) / base if base else None
    return {
        "model": cfg.model,
        **facts,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info({}),
        "p99_budget_ms": budget,
        "objective": "max throughput over the concurrency levels whose p99 <= budget",
        "search": "perf_analyzer over the grid, one bundled server, reload per candidate",
        "load_generator": {"tool": "perf_analyzer", "version": pa.version()},
        # the command, then every setting (as the parsed arguments recorded them)
        "settings": {"command": "tune", **asdict(cfg)},
        "trials": [
            {
                **asdict(t),
                "label": t.knobs.label,
                "score": t.score(budget),
                "best": asdict(b) if (b := t.best(budget)) else None,
            }
            for t in trials
        ],
        "current": asdict(current.knobs),
        "best_measured": asdict(best.knobs),
        "min_gain": cfg.min_gain,
        "winner": asdict(winner.knobs),
        "winner_vs_current": gain,
        "best_vs_current": best_gain,
        "published": False,
    }


def plot(rep: dict, path: Path) -> None:
    """Throughput against p99 per candidate, the budget as a line."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(9, 5))
    for t in rep["trials"]:
        pts = t["points"]
        if not pts:
            continue
        style = "-" if t["knobs"] == rep["winner"] else ":"
        width = 2.5 if t["knobs"] == rep["winner"] or t["is_current"] else 1
        tag = " (winner)" if t["knobs"] == rep["winner"] else ""
        tag += " (current)" if t["is_current"] else ""
        ax.plot(
            [p["p99_ms"] for p in pts],
            [p["throughput"] for p in pts],
            "o" + style,
            lw=width,
            ms=3,
            label=t["label"] + tag,
        )
    ax.axvline(rep["p99_budget_ms"], color="k", ls="--", lw=1, label="p99 budget")
    ax.set(
        xscale="log",
        xlabel="p99 latency (ms, log)",
        ylabel="throughput (images/s)",
        title=f"{rep['model']} configs on {rep['machine']['cpu']}, {rep['machine']['cores']} "
        "cores (i=instances, b=max batch, d=queue delay us)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def markdown_table(rep: dict) -> str:
    """The docs' table of the configs tried (docs/benchmarks.md)."""
    lines = [
        "| instances | max batch | queue delay us | best img/s (p99 <= budget) | at c | p99 ms "
        "| note |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    trials = rep["trials"]
    top_current = max((t["score"] for t in trials if t["is_current"]), default=0.0)
    order = {id(t): i for i, t in enumerate(trials)}
    for t in sorted(trials, key=lambda t: -t["score"]):
        k, b = t["knobs"], t["best"]
        when = "measured first" if order[id(t)] == 0 else "measured last"
        note = ", ".join(
            n
            for n, on in (
                (
                    "winner",
                    k == rep["winner"] and (not t["is_current"] or t["score"] == top_current),
                ),
                (f"current ({when})", t["is_current"]),
                ("best measured", k == rep["best_measured"] and k != rep["winner"]),
                (t["error"], bool(t["error"])),
                ("none within budget", not b and not t["error"]),
            )
            if on
        )
        lines.append(
            f"| {k['instances']} | {k['max_batch_size']} | {k['max_queue_delay_us']} | "
            + (
                f"{b['throughput']:.1f} | {b['concurrency']} | {b['p99_ms']:.0f}"
                if b
                else "- | - | -"
            )
            + f" | {note} |"
        )
    return "\n".join(lines)
