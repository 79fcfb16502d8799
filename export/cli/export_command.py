"""``python -m export [export]``: checkpoint -> ONNX -> parity of every stage -> model
repository (the default command)."""

from __future__ import annotations

import argparse

from export.cli.options import (
    add_engine_arguments,
    add_precision_arguments,
    precision_from,
    profile_from,
    serving_from,
)
from export.formats.tensorrt_rtx import DEFAULT_RTX_TARGETS
from export.triton.config import GPU_BACKENDS, TARGETS, ServingConfig
from serve.core.cli_common import add_admin_key, add_model_repository

EXPORT_DESCRIPTION = (
    "Export a checkpoint to ONNX (0..255 RGB pixels in, normalization inside, dynamic "
    "batch) and FP16 ONNX, compare every stage (ONNX Runtime FP32/FP16, PyTorch FP16, "
    "TensorRT FP16 where available, Triton HTTP/gRPC) with PyTorch on every val image, "
    "build every ONNX with TensorRT-RTX (--trt-rtx-targets), write parity.json/.md/.png, "
    "and publish the next numeric version into the model repository when nothing failed. "
    "Build an engine alone: `python -m export trt`."
)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default="runs/antsbees/checkpoint.pt",
        help="the training run's best checkpoint (make export: $(OUT)/checkpoint.pt)",
    )
    p.add_argument("--name", default="", help="served model name (default: the checkpoint's)")
    p.add_argument(
        "--data", default="", help="dataset for parity (default: the checkpoint's training data)"
    )
    p.add_argument("--split", default="val", help="the data split parity and gates use")
    add_model_repository(p)
    p.add_argument(
        "--out-dir",
        default="",
        help="model files and the parity report (default: the checkpoint's folder)",
    )
    p.add_argument(
        "--onnx-cache",
        default="",
        help="reuse the ONNX graph of an unchanged checkpoint (key: its sha256, opset, torch "
        "and onnx versions) from this folder (default: $TRAINSERVE_ONNX_CACHE, else "
        "~/.cache/trainserve/onnx; 'off' exports every time). Parity always runs.",
    )
    p.add_argument(
        "--no-publish", dest="publish", action="store_false", help="export and check only"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="publish even if parity fails (recorded in the model card)",
    )
    p.add_argument(
        "--parity-limit",
        type=int,
        default=0,
        help="compare on a fixed random subset of N images (0: every image)",
    )
    p.add_argument(
        "--no-fp16-stages",
        dest="fp16_stages",
        action="store_false",
        help="skip the FP16 ONNX / PyTorch FP16 parity stages",
    )
    p.add_argument(
        "--fp16-limit",
        type=int,
        default=1000,
        help="PyTorch FP16 runs slowly on CPU: its stage uses the first N images",
    )
    p.add_argument(
        "--fp16-tolerance",
        type=float,
        default=1e-3,
        help="FP16 stages, advisory: median |diff| within this, absolute or relative "
        "(Polygraphy semantics); recorded in the report (the gate is accuracy-based)",
    )
    p.add_argument(
        "--keep-fp16-edges",
        action="store_true",
        help="keep the first conv and the last layer in FP32 in the FP16 ONNX",
    )
    add_precision_arguments(p)
    p.add_argument(
        "--no-triton-parity",
        dest="triton_parity",
        action="store_false",
        help="skip the stages through a real tritonserver",
    )
    p.add_argument(
        "--deploy",
        default="",
        metavar="HOST:PORT",
        help="after publishing, load the new version on the Triton server at this gRPC "
        "address and record its served accuracy in the card (needs its admin key)",
    )
    add_admin_key(p)
    p.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="FP32 stages: max |logit diff| allowed (tighten only; at most 1e-3)",
    )
    g = p.add_argument_group("serving")
    g.add_argument(
        "--target",
        choices=TARGETS,
        default="cpu",
        help="cpu: python backend + ONNX Runtime; gpu: see --gpu-backend",
    )
    g.add_argument(
        "--gpu-backend",
        choices=GPU_BACKENDS,
        default="tensorrt",
        help="tensorrt: tensorrt_plan engine; onnxruntime: ORT with the TensorRT "
        "accelerator in FP16",
    )
    g.add_argument("--engine", default="", help="a prebuilt model.plan (with its .json)")
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=ServingConfig.max_batch_size,
        help="cpu and gpu-onnxruntime (tensorrt: the profile's --max-batch)",
    )
    g.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=ServingConfig.max_queue_delay_us,
        help="dynamic batching: how long a request waits for others",
    )
    g.add_argument(
        "--instances",
        type=int,
        default=ServingConfig.instances,
        help="classifier instances (each its own backend process on CPU; 0: 2 on CPU, 1 on GPU)",
    )
    g.add_argument(
        "--preprocess-instances",
        type=int,
        default=ServingConfig.preprocess_instances,
        help="<name>_preprocess instances (0: --instances + --slow-lane-slots, so expensive "
        "images in every slot still leave instances for the cheap ones)",
    )
    g.add_argument(
        "--slow-lane-slots",
        type=int,
        default=ServingConfig.slow_lane_slots,
        help="expensive images (decode work over a 16 MP baseline JPEG's) decoded at once, "
        "across the preprocess instances; one more is refused as server busy",
    )
    g.add_argument(
        "--decode-deadline",
        type=float,
        default=ServingConfig.decode_deadline_s,
        help="seconds an expensive image may decode (in a forked child) before it is stopped",
    )
    g.add_argument(
        "--intra-op-threads",
        type=int,
        default=ServingConfig.intra_op_threads,
        help="ONNX Runtime threads per CPU instance (0: the server's cores / instances; "
        "with one instance, ONNX Runtime's default)",
    )
    g.add_argument(
        "--max-queue-size",
        type=int,
        default=ServingConfig.max_queue_size,
        help="Triton queue policy: requests waiting per model (0: none - the public front "
        "bounds the queue; any policy makes Triton 2.51's batcher stall 500 ms)",
    )
    g.add_argument(
        "--queue-timeout-us",
        type=int,
        default=ServingConfig.queue_timeout_us,
        help="Triton queue policy: a request queued longer is rejected (0: none, see "
        "--max-queue-size)",
    )
    g.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="no model_warmup (by default real val images warm every model up at load)",
    )
    g.add_argument(
        "--trt-engine-cache",
        default=ServingConfig.trt_engine_cache_path,
        help="gpu-onnxruntime: where the TensorRT accelerator keeps its engines (per model)",
    )
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers (parity images)")
    g.add_argument(
        "--trt-rtx-targets",
        nargs="+",
        default=list(DEFAULT_RTX_TARGETS),
        metavar="CC",
        help="compute capabilities every ONNX (FP32, FP16, INT8) is built for with "
        "TensorRT-RTX, e.g. 8.6 8.9 12.0 (or 8.6,12.0); `none`: no builds. Recorded in "
        "parity.json tensorrt_builds; engines in <run>/tensorrt_rtx/",
    )
    add_engine_arguments(p)


def run_export_command(a: argparse.Namespace) -> int:
    from export.pipeline.release import ExportConfig, run_export

    profile = profile_from(a)
    cfg = ExportConfig(
        checkpoint=a.checkpoint,
        name=a.name,
        data=a.data,
        split=a.split,
        repository=a.model_repository,
        out_dir=a.out_dir,
        publish=a.publish,
        force=a.force,
        workers=a.workers,
        atol=a.atol,
        parity_limit=a.parity_limit,
        fp16=a.fp16_stages,
        fp16_limit=a.fp16_limit,
        keep_fp16_edges=a.keep_fp16_edges,
        fp16_tolerance=a.fp16_tolerance,
        triton_parity=a.triton_parity,
        deploy=a.deploy,
        admin_key_file=a.admin_key_file or "",
        engine=a.engine,
        timing_cache=a.timing_cache,
        onnx_cache=a.onnx_cache,
        profile=profile,
        trt_rtx_targets=tuple(a.trt_rtx_targets),
        serving=serving_from(a, profile),
        precision=precision_from(a),
    )
    run_export(cfg)
    return 0
