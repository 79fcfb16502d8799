"""Command line: ``python -m export`` (checkpoint -> ONNX -> parity -> model repository) and
``python -m export trt`` (ONNX -> TensorRT engine, on GPU hosts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.release import ExportConfig, ParityFailed, run_export
from export.repository import GPU_BACKENDS, TARGETS, ServingConfig
from export.tensorrt_engine import EngineProfile, TensorRTUnavailable, require_tensorrt


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engine (GPU hosts)")
    g.add_argument("--min-batch", type=int, default=EngineProfile.min_batch)
    g.add_argument("--opt-batch", type=int, default=EngineProfile.opt_batch)
    g.add_argument("--max-batch", type=int, default=EngineProfile.max_batch)
    g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--timing-cache", default="", help="load/save TensorRT's tactic timing cache")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a checkpoint to ONNX (0..255 RGB pixels in, normalization inside, "
        "dynamic batch) and FP16 ONNX, compare every stage (ONNX Runtime FP32/FP16, PyTorch "
        "FP16, TensorRT FP16 where available, Triton HTTP/gRPC) with PyTorch on every val "
        "image, write parity.json/.md/.png, and publish the next numeric version into the "
        "model repository when nothing failed. Build an engine alone: `python -m export trt`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", default="runs/antsbees/checkpoint.pt")
    p.add_argument("--name", default="", help="served model name (default: the checkpoint's)")
    p.add_argument(
        "--data", default="", help="dataset for parity (default: the checkpoint's training data)"
    )
    p.add_argument("--split", default="val")
    p.add_argument("--model-repository", dest="repository", default="model_repository")
    p.add_argument(
        "--out-dir",
        default="",
        help="model files and the parity report (default: the checkpoint's folder)",
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
        help="FP16 stages: median |diff| within this, absolute or relative "
        "(Polygraphy semantics); recorded in the report",
    )
    p.add_argument(
        "--keep-fp16-edges",
        action="store_true",
        help="keep the first conv and the last layer in FP32 in the FP16 ONNX",
    )
    p.add_argument(
        "--no-triton-parity",
        dest="triton_parity",
        action="store_false",
        help="skip the stages through a real tritonserver",
    )
    p.add_argument(
        "--server-url",
        default="auto",
        help="after publishing, if a Triton server is up here (auto: 127.0.0.1:"
        "$GRPC_PORT), load the new version and record its served accuracy; 'none' "
        "to skip",
    )
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
    g.add_argument("--max-queue-delay-us", type=int, default=ServingConfig.max_queue_delay_us)
    g.add_argument("--instances", type=int, default=ServingConfig.instances)
    g.add_argument(
        "--intra-op-threads",
        type=int,
        default=ServingConfig.intra_op_threads,
        help="ONNX Runtime threads per CPU instance (0: ORT default)",
    )
    g.add_argument("--workers", type=int, default=2)
    _engine_args(p)
    return p


def trt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export trt",
        description="Build a TensorRT engine (one optimization profile over the batch axis) "
        "with Polygraphy and write beside it a JSON with the TensorRT version, GPU name and "
        "compute capability, precision and profile. Needs TensorRT and a CUDA GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--onnx", required=True)
    p.add_argument("--out", default="", help="engine path (default: beside the ONNX, model.plan)")
    _engine_args(p)
    return p


def serving_from(a: argparse.Namespace, profile: EngineProfile) -> ServingConfig:
    if a.target == "gpu" and a.gpu_backend == "tensorrt":
        preferred = sorted({profile.opt_batch, profile.max_batch})
        return ServingConfig(
            profile.max_batch, a.max_queue_delay_us, a.instances, 0, "gpu", "tensorrt", preferred
        )
    return ServingConfig(
        a.max_batch_size,
        a.max_queue_delay_us,
        a.instances,
        a.intra_op_threads,
        a.target,
        a.gpu_backend,
    )


def run_trt(argv: list[str]) -> int:
    import onnx

    from export.tensorrt_engine import build_engine

    a = trt_parser().parse_args(argv)
    require_tensorrt()  # the blocker first, before reading anything
    proto = onnx.load(a.onnx, load_external_data=False)
    inp = proto.graph.input[0]
    item = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    out = a.out or str(Path(a.onnx).with_name("model.plan"))
    profile = EngineProfile(a.min_batch, a.opt_batch, a.max_batch, a.fp16)
    meta = build_engine(a.onnx, out, profile, inp.name, item, a.timing_cache or None)
    print(f"wrote {out} and {out}.json: {meta}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the export; errors print one clear line and exit non-zero."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "trt":
            return run_trt(argv[1:])
        a = parser().parse_args(argv)
        profile = EngineProfile(a.min_batch, a.opt_batch, a.max_batch, a.fp16)
        cfg = ExportConfig(
            checkpoint=a.checkpoint,
            name=a.name,
            data=a.data,
            split=a.split,
            repository=a.repository,
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
            server_url=a.server_url,
            engine=a.engine,
            timing_cache=a.timing_cache,
            profile=profile,
            serving=serving_from(a, profile),
        )
        run_export(cfg)
    except ParityFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, RuntimeError, TensorRTUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
