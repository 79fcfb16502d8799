"""``python -m train modules``: the GoogLeNet notes' claim, measured.

The naive Inception module (parallel 1x1, 3x3, 5x5 convolutions and a 3x3 max-pool,
concatenated) against the module with 1x1 reductions, at the same branch widths and the
same input: parameters, FLOPs per image (``torch.utils.flop_counter``: 2 per
multiply-add) and training / inference images/s on this machine; then the whole 32 px
GoogLeNet built both ways. Writes ``bench/local/modules-<date>.json``,
``bench/local/modules-latest.json`` and ``bench/local/modules-latest.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.core.files import atomic_write_json
from train.tools._speed import throughput, torch_machine

log = logging.getLogger(__name__)

# Module positions measured: (Table 1 name, input channels of the reduced network, px)
MODULES = (("3a", 192, 32), ("4e", 528, 16))


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one image of ``shape`` (C, H, W), eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *shape))
    return int(counter.get_total_flops())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_module(name: str, cin: int, px: int, batch: int, steps: int) -> list[dict[str, Any]]:
    """Naive vs reduced Inception module ``name`` (its Table 1 widths) on ``cin`` x px x px."""
    from train.models.cifar import INCEPTION_V1, Inception

    rows = []
    for kind in ("naive", "reduced"):
        torch.manual_seed(0)
        module = Inception(cin, INCEPTION_V1[name], kind)
        row = {
            "what": f"module {name}",
            "inception": kind,
            "input": [cin, px, px],
            "out_channels": module.out_channels,
            "params": _params(module),
            "flops_per_image": count_flops(module, (cin, px, px)),
            "batch": batch,
            **throughput(module, (cin, px, px), batch, steps),
        }
        log.info("modules: %s", row)
        rows.append(row)
    return rows


def measure_network(kind: str, batch: int, steps: int) -> dict[str, Any]:
    """The whole 32 px GoogLeNet (no auxiliary classifiers) with ``kind`` modules."""
    from train.models.cifar import CifarGoogLeNet

    torch.manual_seed(0)
    model = CifarGoogLeNet(10, inception=kind)
    row = {
        "what": "googlenet_cifar",
        "inception": kind,
        "input": [3, 32, 32],
        "out_channels": model.linear.in_features,
        "params": _params(model),
        "flops_per_image": count_flops(model, (3, 32, 32)),
        "batch": batch,
        **throughput(model, (3, 32, 32), batch, steps, classes=10),
    }
    log.info("modules: %s", row)
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """naive / reduced for each measured thing (same run, so ratios compare)."""
    out = []
    for what in dict.fromkeys(r["what"] for r in rows):
        by = {r["inception"]: r for r in rows if r["what"] == what}
        n, r = by["naive"], by["reduced"]
        out.append(
            {
                "what": what,
                "params": round(n["params"] / r["params"], 2),
                "flops": round(n["flops_per_image"] / r["flops_per_image"], 2),
                "train_speed": round(n["train_images_per_s"] / r["train_images_per_s"], 3),
                "infer_speed": round(n["infer_images_per_s"] / r["infer_images_per_s"], 3),
            }
        )
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars per measured thing: params, GFLOPs and images/s, naive vs reduced (log)."""
    from serve.core.plots import plt, save_figure

    rows = report["rows"]
    whats = list(dict.fromkeys(r["what"] for r in rows))
    panels = (
        ("params", "parameters (M)", 1e-6),
        ("flops_per_image", "GFLOPs per image", 1e-9),
        ("train_images_per_s", "train images/s", 1.0),
        ("infer_images_per_s", "inference images/s", 1.0),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.2))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for j, kind in enumerate(("naive", "reduced")):
            vals = [
                next(r[key] for r in rows if r["what"] == w and r["inception"] == kind) * scale
                for w in whats
            ]
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(whats))], vals, 0.4, label=kind)
        ax.set_xticks(range(len(whats)), whats, rotation=15)
        ax.set(yscale="log", title=label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend()
    m = report["machine"]
    fig.suptitle(
        f"Inception v1: naive vs 1x1-reduced, same widths ({m['cpu']}, {m['cores']} cores, "
        f"load {m['loadavg_1m']})",
        fontsize=10,
    )
    save_figure(fig, path)


def run(a: argparse.Namespace) -> int:
    """``python -m train modules``: see the module docstring."""

    if a.threads:
        torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for name, cin, px in MODULES:
        rows += measure_module(name, cin, px, a.module_batch, a.steps)
    rows.append(measure_network("naive", a.naive_net_batch, a.steps))
    rows.append(measure_network("reduced", a.net_batch, a.steps))
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {**torch_machine(), "loadavg_1m_start": round(load0, 2)},
        "flops": "torch.utils.flop_counter.FlopCounterMode, forward, 2 per multiply-add",
        "rows": rows,
        "naive_over_reduced": ratios(rows),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"modules-{stamp}.json", "modules-latest.json"):
        atomic_write_json(out / name, report)
    plot(report, out / "modules-latest.png")
    for r in report["naive_over_reduced"]:
        print(
            f"{r['what']}: naive/reduced params x{r['params']}, FLOPs x{r['flops']}, "
            f"train speed x{r['train_speed']}, inference speed x{r['infer_speed']}"
        )
    print(f"wrote {out}/modules-{stamp}.json, {out}/modules-latest.json, {out}/modules-latest.png")
    return 0
