"""The release parity report: ``parity.json`` + ``parity.md`` + ``parity.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.checks.parity import Stage
from serve.core.files import atomic_write_json


def write_json(report: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, report)


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """A table a reviewer can read in the PR: one row per stage, skipped ones with reasons."""
    lines = [
        f"# Parity report: {report['model']}",
        "",
        f"Checkpoint `{report['checkpoint']}` (sha256 `{report['checkpoint_sha256'][:12]}`), "
        f"{report['images']} {report['split']} images of `{report['data']}`; reference top-1 "
        f"{report['reference_top1']:.2%}. Overall: **{'PASSED' if report['passed'] else 'FAILED'}**"
        + (" (published with --force)" if report.get("forced") else "")
        + ".",
        "",
        "| stage | reference | gate | status | images | top-1 agree | accuracy (reference) "
        "| max abs | mean abs | median abs | median rel | max abs / logit RMS | min req. atol "
        "| note |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- |",
    ]
    for s in report["stages"]:
        agree = "" if s["top1_agreement"] is None else f"{s['top1_agreement']:.2%}"
        status = (
            s["status"] if s["gating"] or s["status"] == "skipped" else f"{s['status']} (advisory)"
        )
        acc = s.get("accuracy")
        acc_text = "" if acc is None else f"{acc:.2%} ({s['reference_accuracy']:.2%})"
        note = s["reason"]
        fb = s.get("fallback") or {}
        first = (s.get("localized") or {}).get("first_over_tolerance")
        if first:
            note += f" first layer over tolerance: {first['node']} ({first['op']})"
        if fb.get("excluded"):
            note += (
                f" fallback kept {len(fb['excluded'])} nodes in FP32: {', '.join(fb['excluded'])}"
            )
        lines.append(
            f"| {s['name']} | {s['reference']} | {s.get('gate', '')} | {status} "
            f"| {s['images'] or ''} | {agree} | {acc_text} "
            f"| {_fmt(s['max_abs'])} | {_fmt(s['mean_abs'])} | {_fmt(s['median_abs'])} "
            f"| {_fmt(s['median_rel'])} | {_fmt(s.get('max_abs_scaled'))} "
            f"| {_fmt(s['min_required_atol'])} | {note.strip()} |"
        )
    lines += [
        "",
        "Gates: FP32 stages (`elementwise`) need 100% top-1 agreement and max |diff| <= "
        "the FP32 tolerance. Reduced-precision stages (`accuracy`: FP16, INT8) need top-1 "
        "agreement with FP32 and labelled accuracy within the allowed drop of FP32's "
        "(thresholds in parity.json `gates`); their element-wise numbers are advisory. "
        "A reduced stage gates publishing only when its model is what is published "
        "(PRECISION, TARGET); otherwise it is advisory. `skipped` stages could not run "
        "here (reason given); they are never dropped silently.",
        "",
    ]
    for s in report["stages"]:
        if s.get("localized"):
            lines += s["localized"]["table"]
    lines += replay_markdown(report.get("bundle") or {})
    lines += rtx_builds_markdown(report.get("tensorrt_builds") or [])
    path.write_text("\n".join(lines))


def replay_markdown(bundle: dict[str, Any]) -> list[str]:
    """How to run each stage again from the bundle alone (parity.md)."""
    if not bundle:
        return []
    lines = [
        "## Replay",
        "",
        f"`{bundle['path']}` holds the exact 8-bit pixels every stage saw, the labels, each "
        "stage's logits, the gates and the model files: copied to another machine it "
        "replays there without the checkpoint, the dataset or torch (exit 0 passed, 3 "
        "failed; `--model FILE` / `--engine PLAN` / `--url HOST:PORT` replay another model, "
        "a TensorRT plan or a running server; `python -m export localize BUNDLE --stage "
        "NAME` finds the first layer of a reduced-precision graph that goes wrong).",
        "",
        "| stage | command |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | `{cmd}` |" for name, cmd in bundle.get("replay", {}).items()]
    return [*lines, ""]


def rtx_builds_markdown(builds: list[dict[str, Any]]) -> list[str]:
    """The TensorRT-RTX builds (one row per ONNX) for parity.md."""
    lines = ["## TensorRT-RTX builds", ""]
    if not builds:
        return [*lines, "None (--trt-rtx-targets none).", ""]
    lines += [
        "| onnx | precision | builder | compute capabilities | status | engine bytes "
        "| seconds | layers | layers by output type | reason |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for b in builds:
        types = ", ".join(f"{k} {v}" for k, v in b["layer_types"].items())
        status = b["status"] if b["status"] == "built" else f"**{b['status']}**"
        lines.append(
            f"| {b['onnx']} | {b['precision']} | {b['builder']} "
            f"| {', '.join(b['compute_capabilities'])} | {status} "
            f"| {b['engine_bytes'] or ''} | {_fmt(b['seconds'])} | {b['layers'] or ''} "
            f"| {types} | {b['reason'].replace('|', '/')} |"
        )
    lines += [
        "",
        "Strongly typed builds: each engine computes in its ONNX graph's types (no FP16/INT8 "
        "builder flags). Building needs no GPU; running these engines does (not done here). "
        "For TARGET=gpu a failed build of the served precision fails the export.",
        "",
    ]
    return lines


def write_histogram(stages: list[Stage], diffs: dict[str, np.ndarray], path: Path) -> None:
    """Histogram of |diff| per stage (log-spaced bins), the shape behind the numbers."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ran = [s for s in stages if s.name in diffs and diffs[s.name].size]
    floor = 1e-9
    all_vals = (
        np.concatenate([np.maximum(diffs[s.name].ravel(), floor) for s in ran])
        if ran
        else np.array([floor, 1.0])
    )
    bins = np.logspace(np.log10(floor), np.log10(max(all_vals.max(), 1e-3) * 2), 60)
    for s in ran:
        status = s.status if s.gating else f"{s.status}, advisory"
        ax.hist(
            np.maximum(diffs[s.name].ravel(), floor),
            bins=bins.tolist(),
            histtype="step",
            lw=1.5,
            label=f"{s.name} vs {s.reference} ({status})",
        )
    ax.axvline(1e-3, color="gray", ls="--", lw=1, label="1e-3 (gate)")
    ax.set(
        xscale="log",
        xlabel=f"|logit difference| (values < {floor:g} shown at {floor:g})",
        ylabel="count",
        title="parity: |difference| per stage",
    )
    skipped = [s.name for s in stages if s.status == "skipped"]
    ax.legend(
        fontsize=8,
        loc="upper right",
        title=("skipped: " + ", ".join(skipped)) if skipped else None,
        title_fontsize=8,
    )
    ax.grid(alpha=0.3)
    save_figure(fig, path)
