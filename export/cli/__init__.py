"""Command line: ``python -m export [export]`` (checkpoint -> ONNX -> parity -> model
repository), ``trt`` (ONNX -> TensorRT engine, or this GPU's plan added to a published
version, on GPU hosts), ``bench`` (``make bench``), ``calibrate``, ``tune`` (``make
tune``) and ``warmup-bench``: the command list here, each group in its own module of this
package (options.py holds the option groups several commands share)."""

from __future__ import annotations

from collections.abc import Sequence

from export.cli.export_command import EXPORT_DESCRIPTION, add_export_arguments, run_export_command
from export.cli.tools import (
    add_bench_arguments,
    add_calibrate_arguments,
    add_tune_arguments,
    add_warmup_bench_arguments,
    run_bench,
    run_calibrate,
    run_tune,
    run_warmup_bench,
)
from export.cli.trt import add_trt_arguments, run_trt
from serve.core.cli_common import Command
from serve.core.cli_common import main as cli_main

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
        "(bench/local/int8-calibration-latest.json and .png).",
    ),
    Command(
        "tune",
        "search the classifier's serving config with perf_analyzer (make tune)",
        add_tune_arguments,
        run_tune,
        description="Search the classifier's serving config (instances x max batch x "
        "queue delay, and the published config as it is) with perf_analyzer through the "
        "front, on a scratch copy of the model folder; --publish writes the winner (a "
        "config change, no new version). Writes <out>/<model>-tune.json and .png.",
    ),
    Command(
        "warmup-bench",
        "first-request latency after a load, with and without the model's warmup",
        add_warmup_bench_arguments,
        run_warmup_bench,
    ),
]


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
