"""Command line: ``python -m export [export]`` (checkpoint -> ONNX -> parity -> model
repository), ``python -m export trt`` (ONNX -> TensorRT engine, or this GPU's plan added
to a published version, on GPU hosts) and ``python -m export bench`` (``make bench``)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from export.tensorrt_engine import DEFAULT_RTX_TARGETS, HARDWARE_LEVELS, EngineProfile
from export.triton_config import GPU_BACKENDS, TARGETS, ServingConfig
from serve.core.cli_common import Command, add_admin_key, add_model_repository
from serve.core.cli_common import main as cli_main
from serve.core.errors import UsageError

log = logging.getLogger(__name__)


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "TensorRT engine (GPU hosts; strongly typed: the precision is the ONNX graph's)"
    )
    g.add_argument(
        "--min-batch", type=int, default=EngineProfile.min_batch, help="engine profile: min batch"
    )
    g.add_argument(
        "--opt-batch",
        type=int,
        default=EngineProfile.opt_batch,
        help="engine profile: the batch TensorRT tunes for",
    )
    g.add_argument(
        "--max-batch", type=int, default=EngineProfile.max_batch, help="engine profile: max batch"
    )
    g.add_argument("--timing-cache", default="", help="load/save TensorRT's tactic timing cache")
    g.add_argument(
        "--version-compatible",
        action="store_true",
        help="TensorRT 10 version-compatible engine (runs on later 10.x releases; Triton "
        "needs --backend-config=tensorrt,version-compatible=true)",
    )
    g.add_argument(
        "--hardware-compatibility",
        choices=HARDWARE_LEVELS,
        default="none",
        help="ampere_plus: one engine for every GPU from sm80 on (published as model.plan, "
        "the fallback of cc_model_filenames)",
    )


def profile_from(a: argparse.Namespace) -> EngineProfile:
    """The engine profile the flags describe."""
    return EngineProfile(
        a.min_batch,
        a.opt_batch,
        a.max_batch,
        version_compatible=a.version_compatible,
        hardware_compatibility=a.hardware_compatibility,
    )


EXPORT_DESCRIPTION = (
    "Export a checkpoint to ONNX (0..255 RGB pixels in, normalization inside, dynamic "
    "batch) and FP16 ONNX, compare every stage (ONNX Runtime FP32/FP16, PyTorch FP16, "
    "TensorRT FP16 where available, Triton HTTP/gRPC) with PyTorch on every val image, "
    "build every ONNX with TensorRT-RTX (--trt-rtx-targets), write parity.json/.md/.png, "
    "and publish the next numeric version into the model repository when nothing failed. "
    "Build an engine alone: `python -m export trt`."
)


def _precision_args(p: argparse.ArgumentParser) -> None:
    from export.int8 import CALIBRATION_METHODS, Calibration
    from export.parity import ACCURACY_GATE
    from export.run_state import PRECISIONS, PrecisionConfig

    g = p.add_argument_group("precision (FP16/INT8 stages are judged by accuracy)")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="what the served model.onnx computes in (TARGET=cpu): int8 or fp16 is published "
        "only when its stage passes the accuracy gate; recorded in the card",
    )
    g.add_argument(
        "--min-agreement",
        type=float,
        default=ACCURACY_GATE.min_agreement,
        help="reduced-precision gate: top-1 agreement with FP32 over every image",
    )
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=ACCURACY_GATE.max_accuracy_drop,
        help="reduced-precision gate: labelled top-1 accuracy at most this far below "
        "FP32's (a fraction: 0.005 = 0.5 points)",
    )
    g.add_argument(
        "--small-set-images",
        type=int,
        default=ACCURACY_GATE.small_set_images,
        help="below this many images the allowed drop is --small-set-drop-images images",
    )
    g.add_argument(
        "--small-set-drop-images",
        type=int,
        default=ACCURACY_GATE.small_set_drop_images,
        help="on a small set: the accuracy drop allowed, in images, and the flips that "
        "break a correct FP32 answer allowed (docs/export-and-parity.md: the accuracy gate)",
    )
    g.add_argument(
        "--small-set-min-agreement",
        type=float,
        default=ACCURACY_GATE.small_set_min_agreement,
        help="on a small set: the top-1 agreement floor (it only lowers --min-agreement)",
    )
    g.add_argument(
        "--min-int8-speedup",
        type=float,
        default=PrecisionConfig.min_int8_speedup,
        help="PRECISION=int8 is published only when in-process ONNX Runtime measures it at "
        "least this many times FP32's images/s (batch 1 and 8, interleaved); else exit 3",
    )
    g.add_argument(
        "--calibration-count",
        type=int,
        default=Calibration.count,
        help="INT8: training images (eval transform) to calibrate on",
    )
    g.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default="MinMax",
        help="INT8: ONNX Runtime's calibration method",
    )
    g.add_argument(
        "--calibration-per-channel",
        action=argparse.BooleanOptionalAction,
        default=Calibration.per_channel,
        help="INT8: per-channel weight scales (--no-calibration-per-channel: per tensor)",
    )
    g.add_argument(
        "--calibration-data",
        default="",
        help="INT8: dataset whose train split calibrates (default: the checkpoint's data)",
    )
    g.add_argument(
        "--no-int8-stage",
        dest="int8_stage",
        action="store_false",
        help="skip the advisory INT8 stage (quantize + check, ~15 s here; PRECISION=int8 needs it)",
    )
    g.add_argument(
        "--no-precision-fallback",
        dest="precision_fallback",
        action="store_false",
        help="do not search for nodes to keep in FP32 when a gating reduced stage fails",
    )
    g.add_argument(
        "--fallback-rounds",
        type=int,
        default=PrecisionConfig.fallback_rounds,
        help="fallback budget: re-checks on the val set at most",
    )
    g.add_argument(
        "--fallback-groups",
        type=int,
        default=PrecisionConfig.fallback_groups,
        help="fallback sensitivity: blocks of consecutive compute nodes measured one at a time",
    )


def precision_from(a: argparse.Namespace):  # noqa: ANN201 - lazy import of the type
    """The PrecisionConfig the flags describe."""
    from export.int8 import Calibration
    from export.parity import AccuracyGate
    from export.run_state import PrecisionConfig

    return PrecisionConfig(
        precision=a.precision,
        gate=AccuracyGate(
            a.min_agreement,
            a.max_accuracy_drop,
            a.small_set_images,
            a.small_set_drop_images,
            a.small_set_min_agreement,
        ),
        min_int8_speedup=a.min_int8_speedup,
        calibration=Calibration(
            count=a.calibration_count,
            method=a.calibration_method,
            per_channel=a.calibration_per_channel,
        ),
        calibration_data=a.calibration_data,
        int8=a.int8_stage,
        fallback=a.precision_fallback,
        fallback_rounds=a.fallback_rounds,
        fallback_groups=a.fallback_groups,
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
    _precision_args(p)
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
    _engine_args(p)


def add_trt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", default="", help="build an engine from this ONNX file")
    p.add_argument("--out", default="", help="engine path (default: beside the ONNX, model.plan)")
    g = p.add_argument_group("add this GPU's plan to a published tensorrt_plan version")
    g.add_argument("--name", default="", help="the model (instead of --onnx)")
    add_model_repository(g)
    g.add_argument("--version", type=int, default=0, help="the version (default: the latest)")
    g.add_argument("--data", default="", help="ImageFolder root: its val images check the engine")
    g.add_argument("--split", default="val")
    g.add_argument("--parity-limit", type=int, default=256, help="images to compare (0: all)")
    g.add_argument(
        "--tolerance",
        type=float,
        default=1e-2,
        help="engine parity: median |diff| vs ONNX Runtime FP32, absolute or relative",
    )
    _engine_args(p)


def serving_from(a: argparse.Namespace, profile: EngineProfile) -> ServingConfig:
    if a.target == "gpu" and a.gpu_backend == "tensorrt":
        preferred = sorted({profile.opt_batch, profile.max_batch})
        return ServingConfig(
            profile.max_batch,
            a.max_queue_delay_us,
            a.instances,
            0,
            "gpu",
            "tensorrt",
            preferred,
            max_queue_size=a.max_queue_size,
            queue_timeout_us=a.queue_timeout_us,
            warmup=a.warmup,
            preprocess_instances=a.preprocess_instances,
            slow_lane_slots=a.slow_lane_slots,
            decode_deadline_s=a.decode_deadline,
        )
    return ServingConfig(
        a.max_batch_size,
        a.max_queue_delay_us,
        a.instances,
        a.intra_op_threads,
        a.target,
        a.gpu_backend,
        max_queue_size=a.max_queue_size,
        queue_timeout_us=a.queue_timeout_us,
        warmup=a.warmup,
        trt_engine_cache_path=a.trt_engine_cache,
        preprocess_instances=a.preprocess_instances,
        slow_lane_slots=a.slow_lane_slots,
        decode_deadline_s=a.decode_deadline,
    )


def run_trt(a: argparse.Namespace) -> int:
    import onnx

    from export.tensorrt_engine import build_engine, require_tensorrt

    require_tensorrt()  # the blocker first, before reading anything
    if a.name:
        from export.engine_add import AddPlan, add_plan

        done = add_plan(
            AddPlan(
                repository=a.model_repository,
                name=a.name,
                data=a.data,
                version=a.version,
                split=a.split,
                limit=a.parity_limit,
                tolerance=a.tolerance,
                profile=profile_from(a),
                timing_cache=a.timing_cache,
            )
        )
        print(f"added {done['plan']}: {done['metadata']['parity']['status']}")
        return 0
    if not a.onnx:
        raise UsageError("give --onnx FILE (build an engine) or --name MODEL (add to a version)")
    proto = onnx.load(a.onnx, load_external_data=False)
    inp = proto.graph.input[0]
    item = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    out = a.out or str(Path(a.onnx).with_name("model.plan"))
    profile = profile_from(a)
    meta = build_engine(a.onnx, out, profile, inp.name, item, a.timing_cache or None)
    print(f"wrote {out} and {out}.json: {meta}")
    return 0


def run_export_command(a: argparse.Namespace) -> int:
    from export.release import ExportConfig, run_export

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


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from export.bench import add_arguments

    add_arguments(p)


def run_bench(a: argparse.Namespace) -> int:
    from export.bench import run

    return run(a)


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    from export.calibration_search import add_arguments

    add_arguments(p)


def run_calibrate(a: argparse.Namespace) -> int:
    from export.calibration_search import run

    return run(a)


COMMANDS = [
    Command(
        "export",
        "checkpoint -> ONNX -> parity of every stage -> model repository (the default)",
        add_export_arguments,
        run_export_command,
        description=EXPORT_DESCRIPTION,
    ),
    Command(
        "trt",
        "build a strongly typed TensorRT engine with Polygraphy (GPU hosts)",
        add_trt_arguments,
        run_trt,
        description="Build a strongly typed TensorRT engine (one optimization profile over "
        "the batch axis; precision: the ONNX graph's, no FP16/INT8 flags) with Polygraphy "
        "and write beside it a JSON with the TensorRT version, GPU name and "
        "compute capability, precision, profile and compatibility flags. With --name: build "
        "this GPU's plan from a published version's model.onnx, check it against ONNX "
        "Runtime FP32 on the val images of --data, and add it to the version "
        "(model.sm<cc>.plan, cc_model_filenames). Needs TensorRT and a CUDA GPU.",
    ),
    Command(
        "bench",
        "serving benchmark with the in-process baselines (ONNX Runtime, PyTorch, TensorRT)",
        add_bench_arguments,
        run_bench,
    ),
    Command(
        "calibrate",
        "INT8 calibration choices (method, per-channel, images) judged on training images",
        add_calibrate_arguments,
        run_calibrate,
        description="Quantize the run's FP32 ONNX once per calibration choice, choose on "
        "held-out training images (never the val images the export gate judges), and "
        "report each choice's val agreement, accuracy and gate verdict beside it "
        "(bench/int8-calibration-latest.json and .png).",
    ),
    Command(
        "tune",
        "search the classifier's serving config with perf_analyzer (make tune)",
        lambda p: _tool("tune").add_arguments(p),
        lambda a: _tool("tune").run(a),
        description="Search the classifier's serving config (instances x max batch x "
        "queue delay, and the published config as it is) with perf_analyzer through the "
        "front, on a scratch copy of the model folder; --publish writes the winner (a "
        "config change, no new version). Writes <out>/<model>-tune.json and .png.",
    ),
    Command(
        "warmup-bench",
        "first-request latency after a load, with and without the model's warmup",
        lambda p: _tool("warmup_bench").add_arguments(p),
        lambda a: _tool("warmup_bench").run_command(a),
    ),
]


def _tool(name: str):  # noqa: ANN202 - the module, imported only when its command is used
    import importlib

    return importlib.import_module(f"export.{name}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m export [export|trt|bench|calibrate|tune|warmup-bench] ...`` (``export``
    by default)."""
    return cli_main(
        "python -m export",
        "Export, check and publish models (`python -m export COMMAND -h`).",
        COMMANDS,
        argv,
        default="export",
    )
