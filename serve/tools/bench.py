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

from serve.backend.preprocess import ResizeCrop
from serve.core.flags import build
from serve.core.machine import gemm_gflops_onnxruntime, machine_info
from serve.tools.bench_config import BENCH_FLAGS, BenchConfig, add_bench_flags
from serve.tools.bench_inputs import (
    BenchInputs,
    bench_inputs,
    image_pipeline_baseline,
    onnxruntime_baseline,
    write_input_data,
)
from serve.tools.bench_report import FRONT_AB_ROUNDS, front_cost, mark_levels
from serve.tools.bench_server import ExternalServer, server_context
from serve.tools.bench_triton import (
    compare_to,
    load_generator,
    loads,
    triton_levels,
)
from serve.tools.loadgen import Level

log = logging.getLogger(__name__)


def new_report(cfg: BenchConfig, inputs: BenchInputs, gemm: dict[str, float]) -> dict:
    """The report skeleton: model, version, cost per image, machine, settings."""
    import time

    card = inputs.card
    return {
        "model": cfg.model,
        "version": int(inputs.version_dir.name),
        "arch": card.arch,
        "precision": card.precision,
        "gflop_per_image": card.gflop_per_image,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(gemm),
        # the command, then every setting (as the parsed arguments recorded them)
        "settings": {"command": "bench", **asdict(cfg)},
        "load_generator": load_generator(cfg),
        "results": [],
        "skipped": {},
    }


def in_process_baselines(cfg: BenchConfig, inputs: BenchInputs) -> tuple[Level, Level]:
    """In-process ONNX Runtime on the served ``model.onnx`` and the in-process image
    pipeline (decode + preprocess + ORT), measured now."""
    onnx_path = inputs.version_dir / "model.onnx"
    ort = onnxruntime_baseline(
        onnx_path, inputs.pixels, cfg.batch, cfg.window, cfg.max_seconds, inputs.card.precision
    )
    pre = inputs.card.preprocessing
    pipeline = image_pipeline_baseline(
        onnx_path,
        inputs.raw,
        ResizeCrop(pre.resize, pre.crop, pre.interpolation),
        cfg.batch,
        cfg.window,
        cfg.max_seconds,
        inputs.card.precision,
    )
    return ort, pipeline


def baseline_report(
    cfg: BenchConfig, data: str, gemm: dict[str, float]
) -> tuple[BenchInputs, dict[str, Any], Level]:
    """The inputs, a new report and its first row: in-process ONNX Runtime on the served
    ``model.onnx`` (every Triton figure is a ratio to it), with its share of the GEMM peak."""
    inputs = bench_inputs(Path(cfg.model_repository), cfg.model, data, max(cfg.batch, 16))
    report = new_report(cfg, inputs, gemm)
    log.info("machine: %s", report["machine"])
    ort, pipeline = in_process_baselines(cfg, inputs)
    peak = report["machine"].get("peak_gflops_fp32")
    if inputs.card.gflop_per_image and peak:
        ort.server["efficiency_of_peak"] = ort.throughput * inputs.card.gflop_per_image / peak
    report["results"].append(asdict(ort))
    log.info("onnxruntime in-process: %.1f img/s", ort.throughput)
    report["results"].append(asdict(pipeline))
    report["image_pipeline_baseline"] = pipeline.throughput
    log.info(
        "image pipeline in-process (decode + preprocess + ORT): %.1f img/s", pipeline.throughput
    )
    return inputs, report, ort


def adjacent_levels(
    front: Any, cfg: BenchConfig, inputs: BenchInputs, report: dict[str, Any]
) -> list[Level]:
    """The ``triton-*`` rows, one protocol x input at a time, each group's ratios taken to
    in-process baselines measured just before and just after it (``report["baselines"]``;
    the ratio is to their mean, ``ratio_min``/``ratio_max`` to each): this machine's speed
    drifts by a third within minutes (docs/benchmarks.md), so a ratio to a baseline from
    the start of the run says more about the drift than about the server."""
    levels: list[Level] = []
    report["baselines"] = []
    before = in_process_baselines(cfg, inputs)
    for protocol in cfg.protocols:
        for kind in cfg.inputs:
            if protocol == "grpc-shm" and kind == "raw":  # shm carries pixel tensors
                continue
            combos = [(protocol, kind, c, r) for c, r in loads(cfg)]
            group = triton_levels(front, cfg, inputs, None, report["skipped"], combos=combos)
            after = in_process_baselines(cfg, inputs)  # and the next group's "before"
            ort = [before[0], after[0]]
            pipeline = (before[1].throughput + after[1].throughput) / 2
            for lv in group:
                compare_to(lv, ort)
            report["baselines"].append(
                {
                    "protocol": protocol,
                    "input": kind,
                    "onnxruntime": sum(b.throughput for b in ort) / 2,
                    "onnxruntime_range": sorted(b.throughput for b in ort),
                    "onnxruntime_cpu_ms_per_image": [b.server.get("cpu_ms_per_image") for b in ort],
                    "image_pipeline": pipeline,
                }
            )
            mark_levels(group, pipeline)
            levels += group
            before = after
    return levels


def sweep(cfg: BenchConfig, inputs: BenchInputs, ort: Level, report: dict[str, Any]) -> list[Level]:
    """The Triton rows (perf_analyzer) on a server of the bench's own: ``triton-*``
    through the public front (what users get; serve/runtime/front.py), and with
    ``--front-cost`` a few levels ``front-*`` and ``direct-*`` (the same tritonserver
    without the front) in turn, ``FRONT_AB_ROUNDS`` times each, so the front's cost is a
    ratio that the machine's drift hits on both sides (``report["front_cost"]``).
    perf_analyzer runs in Triton's namespace, where the front's owner listener and
    Triton's own port need no key. Then
    the lockout figure (``report["lockout"]``: serve/tools/lockout.py). ``--grpc-url``
    measures that server as it is (no lockout figure: it would attack it)."""
    repo = Path(cfg.model_repository)
    with server_context(cfg, repo, Path(cfg.out)) as srv:
        if isinstance(srv, ExternalServer) or cfg.no_front or not srv.in_namespace:
            skipped = report["skipped"]
            levels = triton_levels(srv, cfg, inputs, ort, skipped, direct=cfg.no_front)
            mark_levels(levels, report.get("image_pipeline_baseline"))
        else:
            levels = adjacent_levels(srv, cfg, inputs, report)
            if cfg.front_cost:
                levels += front_cost_levels(srv, cfg, inputs, ort, report)
    if cfg.replicas > 1 and not cfg.grpc_url:
        from serve.tools.replica_bench import compare

        data = write_input_data(inputs, cfg.model, Path(cfg.out) / ".perf_analyzer")["tensor"]
        report["replicas"] = compare(cfg, data, cfg.replicas)
    with server_context(cfg, repo, Path(cfg.out)) as srv:
        if not isinstance(srv, ExternalServer) and cfg.lockout_seconds > 0:
            from serve.tools import lockout

            image = bytes(inputs.raw[0, 0])
            report["lockout"] = lockout.measure(
                srv, cfg.model, inputs.pixels[:1], image, cfg.lockout_seconds
            )
    return levels


def front_cost_levels(
    srv: Any, cfg: BenchConfig, inputs: BenchInputs, ort: Level, report: dict[str, Any]
) -> list[Level]:
    """The front's cost: the same level through the front and direct (Triton's own port
    in its namespace), in turn, so the machine's drift hits both sides alike."""
    pairs = [
        (p, k, c, 0.0)
        for p in ("grpc",)
        if p in cfg.protocols
        for k in cfg.inputs
        for c in sorted({min(cfg.concurrency), 4} & set(cfg.concurrency))
    ]
    paired: list[Level] = []
    direct: list[Level] = []
    for combo in pairs:
        for _ in range(FRONT_AB_ROUNDS):
            paired += triton_levels(srv, cfg, inputs, ort, report["skipped"], "front", [combo])
            direct += triton_levels(
                srv, cfg, inputs, ort, report["skipped"], "direct", [combo], direct=True
            )
    report["front_cost"] = front_cost(paired, direct)
    mark_levels(paired + direct, report.get("image_pipeline_baseline"))
    return paired + direct


def run(cfg: BenchConfig) -> dict[str, Any]:
    """The Triton sweep with the ONNX Runtime in-process baseline; returns the report."""
    inputs, report, ort = baseline_report(cfg, cfg.data, {"onnxruntime": gemm_gflops_onnxruntime()})
    report["results"] += [asdict(lv) for lv in sweep(cfg, inputs, ort, report)]
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (shared with ``python -m export bench``): :data:`BENCH_FLAGS`."""
    add_bench_flags(p)


def main(args: argparse.Namespace) -> int:
    """``python -m serve bench``."""
    from serve.tools.bench_report import markdown_table, write_report

    cfg = build(BenchConfig, args, BENCH_FLAGS)
    if cfg.table:
        print(markdown_table(json.loads(Path(cfg.table).read_text()), cfg.concurrency))
        return 0
    report = run(cfg)
    paths = write_report(report, Path(cfg.out), cfg.model)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
