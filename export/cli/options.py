"""Option groups several ``python -m export`` commands share: the TensorRT engine profile,
the precision and its gate, the serving target; and the configs built from them."""

from __future__ import annotations

import argparse

from export.formats.tensorrt_engine import HARDWARE_LEVELS, EngineProfile
from export.triton.config import ServingConfig


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
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


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    from export.checks.parity import ACCURACY_GATE
    from export.formats.int8 import CALIBRATION_METHODS, Calibration
    from export.pipeline.config import PRECISIONS, PrecisionConfig

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
    from export.checks.parity import AccuracyGate
    from export.formats.int8 import Calibration
    from export.pipeline.config import PrecisionConfig

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
