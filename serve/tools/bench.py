"""``python -m serve bench``: throughput and latency of a served model through Triton, with
ONNX Runtime in-process as the baseline every Triton figure is a ratio to (torch-free).

The Triton rows come from Triton's perf_analyzer (serve/tools/perf_analyzer.py): a closed-loop
concurrency sweep and open-loop request-rate runs (Poisson arrivals) over gRPC, gRPC with
system shared memory and HTTP, tensor input and raw image bytes (``--input-data`` built
from real val images), perf_analyzer's stability rule, its CSV parsed into the report's
rows: throughput, p50/p90/p95/p99 latency, Triton's queue/compute time; errors and the
average executed batch from the statistics API (deltas). The in-process baselines use
``serve.tools.loadgen``. ``python -m export bench`` (``make bench``) runs the same sweep plus
the baselines that need torch (PyTorch eager, a bare TensorRT engine) in one report.
"""

# The Triton rows (perf_analyzer at each level, its CSV as report rows) are
# serve/tools/bench_triton.py; every name still imports from here.

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve.core.machine import gemm_gflops_onnxruntime, machine_info
from serve.core.preprocess import ResizeCrop
from serve.tools.bench_inputs import (
    BenchInputs,
    bench_inputs,
    image_pipeline_baseline,
    onnxruntime_baseline,
)
from serve.tools.bench_report import FRONT_AB_ROUNDS, front_cost, mark_levels
from serve.tools.bench_server import ExternalServer, server_context
from serve.tools.bench_triton import (  # noqa: F401 - re-exported
    PaSettings,
    level_from_row,
    load_generator,
    loads,
    triton_levels,
)
from serve.tools.loadgen import Level

log = logging.getLogger(__name__)


def new_report(args: argparse.Namespace, inputs: BenchInputs, gemm: dict[str, float]) -> dict:
    """The report skeleton: model, version, cost per image, machine, settings."""
    import time

    card = inputs.card
    return {
        "model": args.model,
        "version": int(inputs.version_dir.name),
        "arch": card.arch,
        "precision": card.precision,
        "gflop_per_image": card.gflop_per_image,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(gemm),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "load_generator": load_generator(args),
        "results": [],
        "skipped": {},
    }


def in_process_baselines(args: argparse.Namespace, inputs: BenchInputs) -> tuple[Level, Level]:
    """In-process ONNX Runtime on the served ``model.onnx`` and the in-process image
    pipeline (decode + preprocess + ORT), measured now."""
    onnx_path = inputs.version_dir / "model.onnx"
    ort = onnxruntime_baseline(
        onnx_path, inputs.pixels, args.batch, args.window, args.max_seconds, inputs.card.precision
    )
    pre = inputs.card.preprocessing
    pipeline = image_pipeline_baseline(
        onnx_path,
        inputs.raw,
        ResizeCrop(pre.resize, pre.crop, pre.interpolation),
        args.batch,
        args.window,
        args.max_seconds,
        inputs.card.precision,
    )
    return ort, pipeline


def baseline_report(
    args: argparse.Namespace, data: str, gemm: dict[str, float]
) -> tuple[BenchInputs, dict[str, Any], Level]:
    """The inputs, a new report and its first row: in-process ONNX Runtime on the served
    ``model.onnx`` (every Triton figure is a ratio to it), with its share of the GEMM peak."""
    inputs = bench_inputs(Path(args.model_repository), args.model, data, max(args.batch, 16))
    report = new_report(args, inputs, gemm)
    log.info("machine: %s", report["machine"])
    ort, pipeline = in_process_baselines(args, inputs)
    peak = report["machine"].get("peak_gflops_fp32")
    if inputs.card.gflop_per_image and peak:
        ort.server = {"efficiency_of_peak": ort.throughput * inputs.card.gflop_per_image / peak}
    report["results"].append(asdict(ort))
    log.info("onnxruntime in-process: %.1f img/s", ort.throughput)
    report["results"].append(asdict(pipeline))
    report["image_pipeline_baseline"] = pipeline.throughput
    log.info(
        "image pipeline in-process (decode + preprocess + ORT): %.1f img/s", pipeline.throughput
    )
    return inputs, report, ort


def adjacent_levels(
    front: Any, args: argparse.Namespace, inputs: BenchInputs, report: dict[str, Any]
) -> list[Level]:
    """The ``triton-*`` rows, one protocol x input at a time, each group's ratios taken to
    in-process baselines measured just before it (``report["baselines"]``): this machine's
    speed drifts by a third within minutes (measured: the same ORT session 9.7 -> 14 ms per
    image), so a ratio to a baseline from the start of the run says more about the drift
    than about the server."""
    levels: list[Level] = []
    report["baselines"] = []
    for protocol in args.protocols:
        for kind in args.inputs:
            if protocol == "grpc-shm" and kind == "raw":  # shm carries pixel tensors
                continue
            ort, pipeline = in_process_baselines(args, inputs)
            report["baselines"].append(
                {
                    "protocol": protocol,
                    "input": kind,
                    "onnxruntime": ort.throughput,
                    "image_pipeline": pipeline.throughput,
                }
            )
            combos = [(protocol, kind, c, r) for c, r in loads(args)]
            group = triton_levels(front, args, inputs, ort, report["skipped"], combos=combos)
            mark_levels(group, pipeline.throughput)
            levels += group
    return levels


def sweep(
    args: argparse.Namespace, inputs: BenchInputs, ort: Level, report: dict[str, Any]
) -> list[Level]:
    """The Triton rows (perf_analyzer) on a server of the bench's own: ``triton-*``
    through the public front (what users get; serve/runtime/front.py), and in the same run a few
    levels ``front-*`` and ``direct-*`` (the same tritonserver without the front) in turn,
    ``FRONT_AB_ROUNDS`` times each, so the front's cost is a ratio that the machine's drift
    hits on both sides (``report["front_cost"]``). ``--grpc-url`` measures that server as
    it is."""
    repo = Path(args.model_repository)
    with server_context(args, repo, Path(args.out)) as srv:
        if isinstance(srv, ExternalServer) or args.no_front:
            levels = triton_levels(srv, args, inputs, ort, report["skipped"])
            mark_levels(levels, report.get("image_pipeline_baseline"))
            return levels
        from serve.runtime.front_only import FrontOnly

        with FrontOnly(srv, log_path=Path(args.out) / "bench-front.log") as front:
            levels = adjacent_levels(front, args, inputs, report)
            pairs = [
                (p, k, c, 0.0)
                for p in ("grpc",)
                if p in args.protocols
                for k in args.inputs
                for c in sorted({min(args.concurrency), 4} & set(args.concurrency))
            ]
            # the front's cost: the same level through the front and direct, in turn, so
            # the machine's drift hits both sides alike
            paired: list[Level] = []
            direct: list[Level] = []
            for combo in pairs:
                for _ in range(FRONT_AB_ROUNDS):
                    paired += triton_levels(
                        front, args, inputs, ort, report["skipped"], "front", [combo]
                    )
                    direct += triton_levels(
                        srv, args, inputs, ort, report["skipped"], "direct", [combo]
                    )
    report["front_cost"] = front_cost(paired, direct)
    mark_levels(paired + direct, report.get("image_pipeline_baseline"))
    return levels + paired + direct


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The Triton sweep with the ONNX Runtime in-process baseline; returns the report."""
    inputs, report, ort = baseline_report(
        args, args.data, {"onnxruntime": gemm_gflops_onnxruntime()}
    )
    report["results"] += [asdict(lv) for lv in sweep(args, inputs, ort, report)]
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (shared with ``python -m export bench``)."""
    _add_load_arguments(p)
    _add_measurement_arguments(p)
    _add_server_arguments(p)


def _add_load_arguments(p: argparse.ArgumentParser) -> None:
    """What is measured: the model, its images, protocols, inputs and load levels."""
    p.add_argument("--model", default="antsbees")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--data", default="", help="ImageFolder split with images to send (.../val)")
    p.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32]
    )
    p.add_argument(
        "--protocols",
        type=lambda s: s.split(","),
        default=["grpc", "grpc-shm", "http"],
        help="grpc-shm: gRPC with the pixels in system shared memory (same machine only)",
    )
    p.add_argument("--inputs", type=lambda s: s.split(","), default=["tensor", "raw"])
    p.add_argument(
        "--request-rate",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[10.0, 20.0],
        help="open-loop request rates (requests/s) after the concurrency sweep ('' for none)",
    )
    p.add_argument(
        "--distribution",
        choices=["poisson", "constant"],
        default="poisson",
        help="arrivals of the request-rate runs",
    )


def _add_measurement_arguments(p: argparse.ArgumentParser) -> None:
    """How each level is measured: batch, windows, stability, time caps."""
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--window", type=float, default=1.0, help="seconds per measurement window")
    p.add_argument(
        "--stability",
        type=float,
        default=10.0,
        help="perf_analyzer -s: %% that 3 consecutive windows may differ by",
    )
    p.add_argument(
        "--max-trials", type=int, default=8, help="perf_analyzer -r: windows before giving up"
    )
    p.add_argument(
        "--max-seconds", type=float, default=20.0, help="time cap per in-process baseline"
    )


def _add_server_arguments(p: argparse.ArgumentParser) -> None:
    """Which server is measured, where the report goes, the docs table."""
    p.add_argument(
        "--grpc-url",
        default="",
        help="bench a running server (e.g. the NGC container on a GPU host) instead of "
        "starting the bundled one",
    )
    p.add_argument("--http-url", default="", help="with --grpc-url: its HTTP address")
    p.add_argument(
        "--no-front",
        action="store_true",
        help="measure the bundled tritonserver directly only (default: through the public "
        "front, plus direct levels for the front's cost)",
    )
    p.add_argument("--out", default="bench")
    p.add_argument(
        "--table",
        default="",
        metavar="JSON",
        help="print the docs table of a bench JSON (rows at --concurrency), exit",
    )


def main(args: argparse.Namespace) -> int:
    """``python -m serve bench``."""
    from serve.tools.bench_report import markdown_table, write_report

    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text()), tuple(args.concurrency)))
        return 0
    report = run(args)
    paths = write_report(report, Path(args.out), args.model)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
