"""The export run: checkpoint -> ONNX (FP32, FP16) [-> TensorRT engine] -> parity of every
stage on every val image -> report -> publish when every stage that ran passed."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from export.fp16 import convert_fp16, pytorch_fp16_logits
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from export.parity import FP16_GATE, FP32_GATE, Stage, Thresholds, format_stage, judge, skipped
from export.report import write_histogram, write_json, write_markdown
from export.repository import ServingConfig, publish, publish_image_pipeline, sha256
from export.stage_outputs import (
    encoded_images,
    load_pixels,
    onnxruntime_logits,
    pytorch_logits,
)
from export.tensorrt_engine import EngineProfile, build_engine, tensorrt_logits, tensorrt_status
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
    atol: float = FP32_GATE.atol
    parity_limit: int = 0
    fp16: bool = True
    fp16_limit: int = 1000
    keep_fp16_edges: bool = False
    fp16_tolerance: float = FP16_GATE.atol
    triton_parity: bool = True
    server_url: str = "auto"
    engine: str = ""
    timing_cache: str = ""
    profile: EngineProfile = field(default_factory=EngineProfile)
    serving: ServingConfig = field(default_factory=ServingConfig)


NO_TENSORRT = (
    "TARGET=gpu with the tensorrt backend needs TensorRT and a GPU to build the "
    "engine ({why}); build it on a GPU host (`python -m export trt`) and pass "
    "--engine, or use --gpu-backend onnxruntime"
)


class ParityFailed(RuntimeError):
    """A stage missed its threshold and publishing was refused."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Release:
    """Collects stages and their |diff| arrays for the report."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.diffs: dict[str, np.ndarray] = {}

    def compare(
        self,
        name: str,
        reference: str,
        ref: np.ndarray,
        out: np.ndarray,
        gate: Thresholds,
        gating: bool = True,
    ) -> Stage:
        stage = judge(name, reference, ref, out, gate, gating)
        self.stages.append(stage)
        self.diffs[name] = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
        say(format_stage(stage))
        return stage

    def skip(self, name: str, reference: str, reason: str) -> None:
        self.stages.append(skipped(name, reference, reason))
        say(format_stage(self.stages[-1]))

    @property
    def passed(self) -> bool:
        """No gating stage failed (advisory stages are reported, not enforced)."""
        return all(s.status != "failed" or not s.gating for s in self.stages)


def _tensorrt_stage(
    cfg: ExportConfig,
    rel: Release,
    onnx_path: Path,
    ckpt: dict[str, Any],
    pixels: Any,
    reference: np.ndarray,
    out_dir: Path,
    gate: Thresholds,
) -> Path | None:
    """Build (or take) the engine and compare it; returns the engine path if there is one."""
    wants_engine = cfg.serving.kind == "gpu-tensorrt"
    engine = Path(cfg.engine) if cfg.engine else None
    ok, why = tensorrt_status()
    if not ok:
        if wants_engine and engine is None:
            raise RuntimeError(NO_TENSORRT.format(why=why))
        rel.skip("tensorrt-fp16", "pytorch-fp32", f"{why}; runs on GPU hosts with TensorRT")
        return engine
    if engine is None:
        engine = out_dir / "model.plan"
        meta = build_engine(
            onnx_path,
            engine,
            cfg.profile,
            INPUT_NAME,
            ckpt["preprocess"]["input_size"],
            cfg.timing_cache or None,
        )
        say(
            f"built {engine} ({meta['precision']}, TensorRT {meta['tensorrt_version']}, "
            f"{meta['gpu_name']}, {meta['build_seconds']}s)"
        )
    logits = tensorrt_logits(engine, pixels.batches, INPUT_NAME, OUTPUT_NAME)
    rel.compare(
        "tensorrt-fp16",
        "pytorch-fp32",
        reference,
        logits,
        gate,
        gating=cfg.serving.kind == "gpu-tensorrt",
    )
    return engine


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Export, check every stage, write the report, and publish when nothing failed.

    Returns the report. Raises ParityFailed (after writing the report) when a stage
    failed and ``force`` is off.
    """
    if not 0 < cfg.atol <= FP32_GATE.atol:
        raise ValueError(
            f"atol {cfg.atol:g} must be in (0, {FP32_GATE.atol:g}]: the gate can "
            "be tightened, not loosened (use --force to publish anyway)"
        )
    if cfg.fp16_tolerance <= 0:
        raise ValueError(f"fp16 tolerance must be > 0, got {cfg.fp16_tolerance:g}")
    fp32_gate = Thresholds(min_top1=FP32_GATE.min_top1, stat="max", atol=cfg.atol)
    fp16_gate = Thresholds(
        min_top1=FP16_GATE.min_top1, stat="median", atol=cfg.fp16_tolerance, rtol=cfg.fp16_tolerance
    )
    # FP16 stages gate publishing only when the published model runs in FP16 (GPU targets);
    # for the CPU target (FP32) they are reported as advisory.
    fp16_gating = cfg.serving.target == "gpu"
    if cfg.serving.kind == "gpu-tensorrt" and not cfg.engine:
        ok, why = tensorrt_status()
        if not ok:  # fail before any work
            raise RuntimeError(NO_TENSORRT.format(why=why))
    ckpt_path = Path(cfg.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    name = cfg.name or ckpt.get("model_name") or ckpt_path.parent.name
    data = cfg.data or ckpt.get("config", {}).get("data", "")
    if not data:
        raise ValueError("no --data given and the checkpoint records no data folder")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else ckpt_path.parent
    onnx_path, fp16_path = out_dir / "model.onnx", out_dir / "model_fp16.onnx"

    say(f"exporting {ckpt_path} ({ckpt['arch']}, {len(ckpt['classes'])} classes) -> {onnx_path}")
    export_onnx(ckpt, onnx_path)
    convert_fp16(onnx_path, fp16_path, keep_first_last_fp32=cfg.keep_fp16_edges)
    pixels = load_pixels(ckpt, data, cfg.split, cfg.batch_size, cfg.workers, cfg.parity_limit)
    say(f"parity on {pixels.count} {cfg.split} images of {data}")
    reference = pytorch_logits(ckpt, pixels)
    rel = Release()
    ort32 = onnxruntime_logits(onnx_path, pixels)
    rel.compare("onnxruntime-fp32", "pytorch-fp32", reference, ort32, fp32_gate)
    if cfg.fp16:
        rel.compare(
            "onnxruntime-fp16",
            "pytorch-fp32",
            reference,
            onnxruntime_logits(fp16_path, pixels),
            fp16_gate,
            fp16_gating,
        )
        half, n_half = pytorch_fp16_logits(ckpt, pixels, cfg.fp16_limit)
        rel.compare(
            "pytorch-fp16", "pytorch-fp32", reference[:n_half], half, fp16_gate, fp16_gating
        )
    else:
        for stage_name in ("onnxruntime-fp16", "pytorch-fp16"):
            rel.skip(stage_name, "pytorch-fp32", "disabled (--no-fp16-stages)")
    engine = _tensorrt_stage(cfg, rel, onnx_path, ckpt, pixels, reference, out_dir, fp16_gate)

    card_base = {
        "arch": ckpt["arch"],
        "arch_options": ckpt.get("arch_options", {}),
        "classes": ckpt["classes"],
        "preprocess": ckpt["preprocess"],
        "pretrained": ckpt.get("pretrained", {}),
        "metrics": ckpt.get("metrics", {}),
        "epoch": ckpt.get("epoch"),
        "training_config": ckpt.get("config", {}),
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": sha256(ckpt_path),
        "input": {"name": INPUT_NAME, "dtype": "FP32", "layout": "NCHW", "range": "0..255 RGB"},
        "output": {"name": OUTPUT_NAME, "dtype": "FP32", "kind": "logits"},
    }

    def publish_into(repo: Path, card: dict[str, Any] | None = None) -> Path:
        version = publish(repo, name, onnx_path, ckpt, card or card_base, cfg.serving, engine)
        publish_image_pipeline(repo, name, ckpt, cfg.serving)
        return version

    for protocol in ("http", "grpc"):
        stage_name = f"triton-{protocol}"
        if not cfg.triton_parity:
            rel.skip(stage_name, "onnxruntime-fp32", "disabled (--no-triton-parity)")
            if protocol == "grpc":
                rel.skip("triton-image", "onnxruntime-fp32", "disabled (--no-triton-parity)")
        elif cfg.serving.target != "cpu":
            reason = (
                "the bundled tritonserver has only the python backend; serve the GPU "
                "repository with the NGC container (serve/docker-compose.gpu.yml)"
            )
            rel.skip(stage_name, "onnxruntime-fp32", reason)
            if protocol == "grpc":
                rel.skip("triton-image", "onnxruntime-fp32", reason)
    if cfg.triton_parity and cfg.serving.target == "cpu":
        from export.triton_parity import triton_logits

        images = encoded_images(ckpt, data, cfg.split, cfg.parity_limit)
        served = triton_logits(publish_into, name, pixels, images)
        for key, logits in served.items():
            rel.compare(f"triton-{key}", "onnxruntime-fp32", ort32, logits, fp32_gate)

    report = {
        "model": name,
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": sha256(ckpt_path),
        "onnx": str(onnx_path),
        "onnx_fp16": str(fp16_path),
        "engine": str(engine) if engine else None,
        "target": cfg.serving.kind,
        "data": str(data),
        "split": cfg.split,
        "images": pixels.count,
        "reference_top1": float((reference.argmax(1) == pixels.labels).mean()),
        "passed": rel.passed,
        "forced": bool(cfg.force and not rel.passed),
        "stages": [s.to_dict() for s in rel.stages],
        "versions": {
            "torch": str(torch.__version__),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }
    write_json(report, out_dir / "parity.json")
    write_markdown(report, out_dir / "parity.md")
    write_histogram(rel.stages, rel.diffs, out_dir / "parity.png")
    say(f"wrote {out_dir}/parity.json, parity.md, parity.png")
    if not rel.passed and not cfg.force:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in rel.stages if s.status == "failed")
        raise ParityFailed(
            f"parity failed, not publishing ({reasons}); see {out_dir / 'parity.md'}"
        )
    if cfg.publish:
        card = {
            **card_base,
            "parity": {k: report[k] for k in ("passed", "forced", "images", "stages")},
        }
        target = publish_into(Path(cfg.repository), card)
        report["published"] = str(target)
        say(f"published {name} version {target.name} ({cfg.serving.kind}) -> {target}")
        if report["forced"]:
            say("WARNING: published despite failed parity (--force); recorded in the model card")
        if cfg.server_url != "none":
            from export.served import default_server_url, deploy_and_measure

            url = default_server_url() if cfg.server_url == "auto" else cfg.server_url
            served = deploy_and_measure(
                url, name, target, str(data), cfg.split, report["reference_top1"]
            )
            report["served"] = served
            if served["status"] == "measured":
                say(
                    f"live server {url}: loaded {name} v{target.name}; served accuracy "
                    f"{served['accuracy']:.4f} on {served['images']} images (in-process "
                    f"{served['in_process_top1']:.4f}); recorded in the model card"
                )
            elif served["status"] != "no server":
                say(f"live server {url}: {served['status']}: {served.get('note', '')}")
    return report
