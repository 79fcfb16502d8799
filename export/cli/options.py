"""Option groups several ``python -m export`` commands share: the TensorRT engine profile,
the precision and its gate, the serving target; and the configs built from them. Each
flag is declared once, for its config field (:class:`serve.core.flags.Flag`): its
default, type and choices are the field's."""

from __future__ import annotations

import argparse

from export.formats.tensorrt_engine import EngineProfile
from export.triton.config import ServingConfig
from serve.core.flags import Flag, add_flags, build

ENGINE_FLAGS = [
    Flag("min_batch", "--min-batch", "engine profile: min batch"),
    Flag("opt_batch", "--opt-batch", "engine profile: the batch TensorRT tunes for"),
    Flag("max_batch", "--max-batch", "engine profile: max batch"),
    Flag(
        "version_compatible",
        "--version-compatible",
        "TensorRT 10 version-compatible engine (runs on later 10.x releases; Triton "
        "needs --backend-config=tensorrt,version-compatible=true)",
    ),
    Flag(
        "hardware_compatibility",
        "--hardware-compatibility",
        "ampere_plus: one engine for every GPU from sm80 on (published as model.plan, "
        "the fallback of cc_model_filenames)",
    ),
]

PRECISION_FLAGS = [
    Flag(
        "precision",
        "--precision",
        "what the served model.onnx computes in (TARGET=cpu): int8 or fp16 is published "
        "only when its stage passes the accuracy gate; recorded in the card",
    ),
    Flag(
        "gate.min_agreement",
        "--min-agreement",
        "reduced-precision gate: top-1 agreement with FP32 over every image",
    ),
    Flag(
        "gate.max_accuracy_drop",
        "--max-accuracy-drop",
        "reduced-precision gate: labelled top-1 accuracy at most this far below "
        "FP32's (a fraction: 0.005 = 0.5 points)",
    ),
    Flag(
        "gate.small_set_images",
        "--small-set-images",
        "below this many images the allowed drop is --small-set-drop-images images",
    ),
    Flag(
        "gate.small_set_drop_images",
        "--small-set-drop-images",
        "on a small set: the accuracy drop allowed, in images, and the flips that "
        "break a correct FP32 answer allowed (docs/export-and-parity.md: the accuracy gate)",
    ),
    Flag(
        "gate.small_set_min_agreement",
        "--small-set-min-agreement",
        "on a small set: the top-1 agreement floor (it only lowers --min-agreement)",
    ),
    Flag(
        "min_int8_speedup",
        "--min-int8-speedup",
        "PRECISION=int8 is published only when in-process ONNX Runtime measures it at "
        "least this many times FP32's images/s (batch 1 and 8, interleaved); else exit 3",
    ),
    Flag(
        "calibration.count",
        "--calibration-count",
        "INT8: training images (eval transform) to calibrate on",
    ),
    Flag("calibration.method", "--calibration-method", "INT8: ONNX Runtime's calibration method"),
    Flag(
        "calibration.per_channel",
        "--calibration-per-channel",
        "INT8: per-channel weight scales (--no-calibration-per-channel: per tensor)",
    ),
    Flag(
        "calibration_data",
        "--calibration-data",
        "INT8: dataset whose train split calibrates (default: the checkpoint's data)",
    ),
    Flag(
        "int8",
        "--no-int8-stage",
        "skip the advisory INT8 stage (quantize + check, ~15 s here; PRECISION=int8 needs it)",
    ),
    Flag(
        "fallback",
        "--no-precision-fallback",
        "do not search for nodes to keep in FP32 when a gating reduced stage fails",
    ),
    Flag(
        "fallback_rounds", "--fallback-rounds", "fallback budget: re-checks on the val set at most"
    ),
    Flag(
        "fallback_groups",
        "--fallback-groups",
        "fallback sensitivity: blocks of consecutive compute nodes measured one at a time",
    ),
]

SERVING_FLAGS = [
    Flag("target", "--target", "cpu: python backend + ONNX Runtime; gpu: see --gpu-backend"),
    Flag(
        "gpu_backend",
        "--gpu-backend",
        "tensorrt: tensorrt_plan engine; onnxruntime: ORT with the TensorRT accelerator in FP16",
    ),
    Flag(
        "max_batch_size",
        "--max-batch-size",
        "cpu and gpu-onnxruntime (tensorrt: the profile's --max-batch)",
    ),
    Flag(
        "max_queue_delay_us",
        "--max-queue-delay-us",
        "dynamic batching: how long a request waits for others",
    ),
    Flag(
        "instances",
        "--instances",
        "classifier instances (each its own backend process on CPU; 0: 2 on CPU, 1 on GPU)",
    ),
    Flag(
        "preprocess_instances",
        "--preprocess-instances",
        "<name>_preprocess instances (0: --instances + --slow-lane-slots, so expensive "
        "images in every slot still leave instances for the cheap ones)",
    ),
    Flag(
        "slow_lane_slots",
        "--slow-lane-slots",
        "expensive images (decode work over a 16 MP baseline JPEG's) decoded at once, "
        "across the preprocess instances; one more is refused as server busy",
    ),
    Flag(
        "decode_deadline_s",
        "--decode-deadline",
        "seconds an expensive image may decode (in a forked child) before it is stopped",
    ),
    Flag(
        "intra_op_threads",
        "--intra-op-threads",
        "ONNX Runtime threads per CPU instance (0: the server's cores / instances; "
        "with one instance, ONNX Runtime's default)",
    ),
    Flag(
        "max_queue_size",
        "--max-queue-size",
        "Triton queue policy: requests waiting per model (0: none - the public front "
        "bounds the queue; any policy makes Triton 2.51's batcher stall 500 ms)",
    ),
    Flag(
        "queue_timeout_us",
        "--queue-timeout-us",
        "Triton queue policy: a request queued longer is rejected (0: none, see --max-queue-size)",
    ),
    Flag(
        "warmup",
        "--no-warmup",
        "no model_warmup (by default real val images warm every model up at load)",
    ),
    Flag(
        "trt_engine_cache_path",
        "--trt-engine-cache",
        "gpu-onnxruntime: where the TensorRT accelerator keeps its engines (per model)",
    ),
]


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "TensorRT engine (GPU hosts; strongly typed: the precision is the ONNX graph's)"
    )
    add_flags(g, EngineProfile, ENGINE_FLAGS[:3])
    g.add_argument("--timing-cache", default="", help="load/save TensorRT's tactic timing cache")
    add_flags(g, EngineProfile, ENGINE_FLAGS[3:])


def profile_from(a: argparse.Namespace) -> EngineProfile:
    """The engine profile the flags describe."""
    return build(EngineProfile, a, ENGINE_FLAGS)


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    from export.pipeline.config import PrecisionConfig

    g = p.add_argument_group("precision (FP16/INT8 stages are judged by accuracy)")
    add_flags(g, PrecisionConfig, PRECISION_FLAGS)


def precision_from(a: argparse.Namespace):  # noqa: ANN201 - lazy import of the type
    """The PrecisionConfig the flags describe."""
    from export.pipeline.config import PrecisionConfig

    return build(PrecisionConfig, a, PRECISION_FLAGS)


def add_serving_arguments(g: argparse._ArgumentGroup) -> None:
    add_flags(g, ServingConfig, SERVING_FLAGS)


def serving_from(a: argparse.Namespace, profile: EngineProfile) -> ServingConfig:
    """The serving config the flags describe; ``tensorrt_plan`` takes its batch sizes from
    the engine profile (and runs no ONNX Runtime threads)."""
    if a.target == "gpu" and a.gpu_backend == "tensorrt":
        preferred = sorted({profile.opt_batch, profile.max_batch})
        return build(
            ServingConfig,
            a,
            SERVING_FLAGS,
            max_batch_size=profile.max_batch,
            intra_op_threads=0,
            preferred_batch_sizes=preferred,
        )
    return build(ServingConfig, a, SERVING_FLAGS)
