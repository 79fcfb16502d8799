"""The export run: checkpoint -> ONNX -> parity on every val image -> publish."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from export.onnx_export import export_onnx
from export.parity import FP32_GATE, Stage, Thresholds, format_stage, judge
from export.repository import ServingConfig, publish, sha256
from export.stage_outputs import load_pixels, onnxruntime_logits, pytorch_logits
from train.checkpoint import load_checkpoint


@dataclass
class ExportConfig:
    """Inputs of one export run."""

    checkpoint: str
    name: str = ""
    data: str = ""
    split: str = "val"
    repository: str = "model_repository"
    out_dir: str = ""
    publish: bool = True
    force: bool = False
    batch_size: int = 32
    workers: int = 2
    atol: float = FP32_GATE.max_abs or 1e-3
    parity_limit: int = 0
    serving: ServingConfig = field(default_factory=ServingConfig)


class ParityFailed(RuntimeError):
    """A stage missed its threshold and publishing was refused."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Export, check parity, write parity.json, and publish when every stage passed.

    Returns the parity report. Raises ParityFailed (after writing parity.json)
    when a stage failed and ``force`` is off.
    """
    if not 0 < cfg.atol <= (FP32_GATE.max_abs or 1e-3):
        raise ValueError(
            f"atol {cfg.atol:g} must be in (0, {FP32_GATE.max_abs:g}]: the gate can "
            "be tightened, not loosened (use --force to publish anyway)"
        )
    gate = Thresholds(min_top1=FP32_GATE.min_top1, max_abs=cfg.atol)
    ckpt_path = Path(cfg.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    name = cfg.name or ckpt.get("model_name") or ckpt_path.parent.name
    data = cfg.data or ckpt.get("config", {}).get("data", "")
    if not data:
        raise ValueError("no --data given and the checkpoint records no data folder")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_path.parent
    onnx_path = out_dir / "model.onnx"

    say(f"exporting {ckpt_path} ({ckpt['arch']}, classes {ckpt['classes']}) -> {onnx_path}")
    export_onnx(ckpt, onnx_path)
    pixels = load_pixels(ckpt, data, cfg.split, cfg.batch_size, cfg.workers, cfg.parity_limit)
    say(f"parity on {pixels.count} {cfg.split} images of {data}")
    reference = pytorch_logits(ckpt, pixels)
    stages: list[Stage] = [
        judge(
            "onnxruntime-fp32",
            "pytorch-fp32",
            reference,
            onnxruntime_logits(onnx_path, pixels),
            gate,
        ),
    ]
    passed = all(s.status != "failed" for s in stages)
    report = {
        "model": name,
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": sha256(ckpt_path),
        "onnx": str(onnx_path),
        "data": str(data),
        "split": cfg.split,
        "images": pixels.count,
        "reference_top1": float((reference.argmax(1) == pixels.labels).mean()),
        "passed": passed,
        "forced": bool(cfg.force and not passed),
        "stages": [s.to_dict() for s in stages],
        "versions": {
            "torch": str(torch.__version__),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }
    for s in stages:
        say(format_stage(s))
    report_path = out_dir / "parity.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {report_path}")
    if not passed and not cfg.force:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in stages if s.status == "failed")
        raise ParityFailed(f"parity failed, not publishing ({reasons}); see {report_path}")
    if cfg.publish:
        card = {
            "arch": ckpt["arch"],
            "classes": ckpt["classes"],
            "preprocess": ckpt["preprocess"],
            "pretrained": ckpt.get("pretrained", {}),
            "metrics": ckpt.get("metrics", {}),
            "epoch": ckpt.get("epoch"),
            "training_config": ckpt.get("config", {}),
            "checkpoint": str(ckpt_path),
            "checkpoint_sha256": report["checkpoint_sha256"],
            "parity": {k: report[k] for k in ("passed", "forced", "images", "stages")},
            "input": {"name": "input", "dtype": "FP32", "layout": "NCHW", "range": "0..255 RGB"},
            "output": {"name": "logits", "dtype": "FP32", "kind": "logits"},
        }
        target = publish(cfg.repository, name, onnx_path, ckpt, card, cfg.serving)
        report["published"] = str(target)
        say(f"published {name} version {target.name} -> {target}")
        if report["forced"]:
            say("WARNING: published despite failed parity (--force); recorded in the model card")
    return report
