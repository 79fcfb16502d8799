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
from serve.tools import perf_analyzer_install as pa_install


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
        "load_generator": {"tool": "perf_analyzer", "version": pa_install.version()},
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


MARKERS = "osD^v<>Ph*Xd"


def plot(rep: dict, path: Path) -> None:
    """Throughput against p99 per candidate (one colour and marker per config; a config
    measured twice - the current one, first and last - dashed the second time), points
    labelled with their concurrency, points over the p99 budget crossed out, the winner
    drawn thick, the budget as a line."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(11, 6))
    styles: dict[str, tuple[Any, str]] = {}
    seen: set[str] = set()
    budget = rep["p99_budget_ms"]
    for t in rep["trials"]:
        pts = t["points"]
        if not pts:
            continue
        label = t["label"]
        if label not in styles:
            n = len(styles)
            styles[label] = (plt.get_cmap("tab20")(n % 20), MARKERS[n % len(MARKERS)])
        color, marker = styles[label]
        winner = t["knobs"] == rep["winner"]
        tags = [tag for tag, on in (("winner", winner), ("current", t["is_current"])) if on]
        again = label in seen
        seen.add(label)
        name = label + (f" ({', '.join(tags)})" if tags else "") + (" again" if again else "")
        xs, ys = [p["p99_ms"] for p in pts], [p["throughput"] for p in pts]
        ax.plot(
            xs,
            ys,
            ls="--" if again else "-",
            marker=marker,
            color=color,
            lw=2.5 if winner else 1,
            ms=5,
            label=name,
        )
        for p in pts:
            ax.annotate(
                f"c{p['concurrency']}",
                (p["p99_ms"], p["throughput"]),
                fontsize=6,
                textcoords="offset points",
                xytext=(3, 3),
            )
        over = [p for p in pts if p["p99_ms"] > budget]
        ax.plot([p["p99_ms"] for p in over], [p["throughput"] for p in over], "x", color="red")
    ax.plot([], [], "x", color="red", label="over the p99 budget")
    ax.axvline(budget, color="k", ls="--", lw=1, label=f"p99 budget {budget:g} ms")
    m = rep["machine"]
    ax.set(
        xscale="log",
        xlabel="p99 latency (ms, log)",
        ylabel="throughput (images/s)",
        title=f"{rep['model']} v{rep.get('version', '?')} ({str(rep.get('precision', '')).upper()})"
        f" configs on {m['cpu']}, {m['cores']} cores, {str(rep.get('date', ''))[:10]}\n"
        "i=instances, b=max batch, d=queue delay (us); labels: concurrency",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
