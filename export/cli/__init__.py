"""Command line: ``python -m export [export]`` (checkpoint -> ONNX -> parity -> model
repository), ``replay`` and ``localize`` (a stage again from its parity bundle; the first
layer that goes wrong), ``profile`` (every runtime across batch sizes), ``trt`` (ONNX ->
TensorRT engine, or this GPU's plan added to a published version, on GPU hosts),
``bench`` (``make bench``), ``calibrate``, ``tune`` (``make tune``) and
``warmup-bench``: the command list here, each group in its own module of this package
(options.py holds the option groups several commands share)."""

from __future__ import annotations

from collections.abc import Sequence

from export.cli.export_command import EXPORT_DESCRIPTION, add_export_arguments, run_export_command
from export.cli.tools import (
    add_bench_arguments,
    add_calibrate_arguments,
    add_localize_arguments,
    add_profile_arguments,
    add_replay_arguments,
    add_tune_arguments,
    add_warmup_bench_arguments,
    run_bench,
    run_calibrate,
    run_localize,
    run_profile,
    run_replay,
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
        "replay",
        "run one parity stage again from its bundle alone, judged as the export did",
        add_replay_arguments,
        run_replay,
        description="Run one stage of an export's parity again from its bundle "
        "(runs/<model>/parity, or a version's report/parity) alone: the exact pixels, the "
        "saved reference and outputs, the gate and the model file; no checkpoint, dataset "
        "or torch (except for the PyTorch stages). Judged against the saved reference and "
        "against the stage's saved outputs under the stage's own gate; exit 0 passed, 3 "
        "failed. --model/--engine/--url replay another file, a TensorRT plan, a running "
        "Triton.",
    ),
    Command(
        "localize",
        "the first layer where a reduced-precision graph diverges from FP32",
        add_localize_arguments,
        run_localize,
        description="Run a reduced-precision stage's graph and the FP32 graph from a "
        "parity bundle in ONNX Runtime with every node output exposed, on the images the "
        "stage gets most wrong; report each layer's error relative to its tensor's scale "
        "in graph order, the first over the tolerance, and a plot "
        "(localize-<stage>.json/.md/.png).",
    ),
    Command(
        "profile",
        "every in-process runtime across batch sizes 1..64 (images/s, latency, saturation)",
        add_profile_arguments,
        run_profile,
        description="PyTorch FP32 and ONNX Runtime FP32/FP16/INT8 (a TensorRT plan with "
        "--engine) at batch 1, 2, 4, ..., 64 on the parity bundle's images: median and p90 "
        "latency, images/s and the batch each runtime saturates at. Writes "
        "<out>/<model>-batch-sweep.json and .png.",
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
    """``python -m export COMMAND ...`` (``export`` by default; :data:`COMMANDS` lists
    them)."""
    return cli_main(
        "python -m export",
        "Export, check and publish models (`python -m export COMMAND -h`).",
        COMMANDS,
        argv,
        default="export",
    )
