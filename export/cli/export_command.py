"""``python -m export [export]``: checkpoint -> ONNX -> parity of every stage -> model
repository (the default command)."""

from __future__ import annotations

import argparse

from export.cli.options import (
    add_engine_arguments,
    add_precision_arguments,
    add_serving_arguments,
    precision_from,
    profile_from,
    serving_from,
)
from serve.core.cli_common import add_admin_key, add_model_repository
from serve.core.flags import Flag, add_flags, build

EXPORT_DESCRIPTION = (
    "Export a checkpoint to ONNX (0..255 RGB pixels in, normalization inside, dynamic "
    "batch) and FP16 ONNX, compare every stage (ONNX Runtime FP32/FP16, PyTorch FP16, "
    "TensorRT FP16 where available, Triton HTTP/gRPC) with PyTorch on every val image, "
    "build every ONNX with TensorRT-RTX (--trt-rtx-targets), write parity.json/.md/.png, "
    "and publish the next numeric version into the model repository when nothing failed. "
    "Build an engine alone: `python -m export trt`."
)


EXPORT_FLAGS = [
    Flag(
        "checkpoint",
        "--checkpoint",
        "the training run's best checkpoint (make export: $(OUT)/checkpoint.pt)",
        {"default": "runs/antsbees/checkpoint.pt"},
    ),
    Flag("name", "--name", "served model name (default: the checkpoint's)"),
    Flag("data", "--data", "dataset for parity (default: the checkpoint's training data)"),
    Flag("split", "--split", "the data split parity and gates use"),
]
OUTPUT_FLAGS = [
    Flag(
        "out_dir",
        "--out-dir",
        "model files and the parity report (default: the checkpoint's folder)",
    ),
    Flag(
        "onnx_cache",
        "--onnx-cache",
        "reuse the ONNX graph of an unchanged checkpoint (key: its sha256, opset, torch "
        "and onnx versions) from this folder (default: $TRAINSERVE_ONNX_CACHE, else "
        "~/.cache/trainserve/onnx; 'off' exports every time). Parity always runs.",
    ),
    Flag("publish", "--no-publish", "export and check only"),
    Flag("force", "--force", "publish even if parity fails (recorded in the model card)"),
    Flag(
        "parity_limit",
        "--parity-limit",
        "compare on a fixed stratified sample of N images (every class; 0: every image)",
    ),
    Flag("fp16", "--no-fp16-stages", "skip the FP16 ONNX / PyTorch FP16 parity stages"),
    Flag(
        "advisory",
        "--advisory",
        "reduced-precision stages that are not published (they decide nothing): on a "
        "stratified sample (every class, seed 0), on every image, or off; INT8 is "
        "quantized only with PRECISION=int8 or 'all'",
    ),
    Flag("advisory_sample", "--advisory-sample", "images in the advisory stages' sample"),
    Flag(
        "fp16_tolerance",
        "--fp16-tolerance",
        "FP16 stages, advisory: median |diff| within this, absolute or relative "
        "(Polygraphy semantics); recorded in the report (the gate is accuracy-based)",
    ),
    Flag(
        "keep_fp16_edges",
        "--keep-fp16-edges",
        "keep the first conv and the last layer in FP32 in the FP16 ONNX",
    ),
]
TRITON_FLAGS = [
    Flag("triton_parity", "--no-triton-parity", "skip the stages through a real tritonserver"),
    Flag(
        "deploy",
        "--deploy",
        "after publishing, load the new version on the Triton server at this gRPC "
        "address and record its served accuracy in the card (needs its admin key)",
        {"metavar": "HOST:PORT"},
    ),
]
ATOL_FLAG = Flag(
    "atol", "--atol", "FP32 stages: max |logit diff| allowed (tighten only; at most 1e-3)"
)
ENGINE_FILE_FLAGS = [
    Flag("engine", "--engine", "a prebuilt model.plan (with its .json)"),
    Flag("workers", "--workers", "DataLoader workers (parity images)"),
    Flag(
        "trt_rtx_targets",
        "--trt-rtx-targets",
        "compute capabilities every ONNX (FP32, FP16, INT8) is built for with "
        "TensorRT-RTX, e.g. 8.6 8.9 12.0 (or 8.6,12.0); `none`: no builds. Recorded in "
        "parity.json tensorrt_builds; engines in <run>/tensorrt_rtx/",
        {"metavar": "CC"},
    ),
]
ALL_EXPORT_FLAGS = [*EXPORT_FLAGS, *OUTPUT_FLAGS, *TRITON_FLAGS, ATOL_FLAG, *ENGINE_FILE_FLAGS]


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from export.pipeline.config import ExportConfig

    add_flags(p, ExportConfig, EXPORT_FLAGS)
    add_model_repository(p)
    add_flags(p, ExportConfig, OUTPUT_FLAGS)
    add_precision_arguments(p)
    add_flags(p, ExportConfig, TRITON_FLAGS)
    add_admin_key(p)
    add_flags(p, ExportConfig, [ATOL_FLAG])
    g = p.add_argument_group("serving")
    add_serving_arguments(g)
    add_flags(g, ExportConfig, ENGINE_FILE_FLAGS)
    add_engine_arguments(p)


def run_export_command(a: argparse.Namespace) -> int:
    from export.pipeline.config import ExportConfig
    from export.pipeline.release import run_export

    profile = profile_from(a)
    cfg = build(
        ExportConfig,
        a,
        ALL_EXPORT_FLAGS,
        repository=a.model_repository,  # the shared flags of serve.core.cli_common
        admin_key_file=a.admin_key_file or "",
        timing_cache=a.timing_cache,  # the engine group's (python -m export trt's too)
        profile=profile,
        serving=serving_from(a, profile),
        precision=precision_from(a),
    )
    run_export(cfg)
    return 0
