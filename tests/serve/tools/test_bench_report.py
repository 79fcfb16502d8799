"""The bench's table and plot say what each row is: a precision column, where it ran
(in-process, through the front, Triton direct), the ratio to in-process ONNX Runtime with
its range over the baselines around it, CPU time per image, failed levels marked, and a
title naming model, version, precision and machine."""

from __future__ import annotations

from pathlib import Path

from serve.tools.bench_report import markdown_table, plot


def _row(backend: str, **kw: object) -> dict:
    row = {
        "backend": backend,
        "input": "tensor",
        "precision": "fp32",
        "batch": 1,
        "concurrency": 1,
        "throughput": 100.0,
        "p50_ms": 10.0,
        "p90_ms": 11.0,
        "p95_ms": 12.0,
        "p99_ms": 13.0,
        "errors": 0,
        "request_rate": None,
        "server": {},
        "ratio_to_onnxruntime": None,
    }
    return {**row, **kw}


REPORT = {
    "model": "antsbees",
    "version": 3,
    "arch": "resnet18",
    "precision": "int8",
    "date": "2026-12-07T10:00:00",
    "machine": {"cpu": "AMD EPYC", "cores": 2},
    "results": [
        _row("onnxruntime", server={"cpu_ms_per_image": 15.0}),
        _row("onnxruntime", precision="int8", throughput=180.0),
        _row(
            "triton-grpc",
            concurrency=4,
            throughput=90.0,
            ratio_to_onnxruntime=0.9,
            server={
                "ratio_min": 0.8,
                "ratio_max": 1.1,
                "cpu_ms_per_image": 16.5,
                "cpu_ratio_to_onnxruntime": 1.1,
                "avg_executed_batch": 1.5,
            },
        ),
        _row("triton-grpc", concurrency=16, errors=3, server={"stall": 1.0}),
        _row("triton-grpc", concurrency=0, request_rate=10.0, throughput=10.0),
        _row("triton-grpc", concurrency=8),  # not a requested level
    ],
}


def test_the_table_names_precision_place_spread_and_failures() -> None:
    table = markdown_table(REPORT, (1, 4, 16))
    lines = table.splitlines()
    assert lines[0] == "antsbees v3 (resnet18, INT8) on AMD EPYC, 2 cores, 2026-12-07"
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5  # c=8 left out
    ort_fp32, ort_int8, c4, c16, rate = (r.split(" | ") for r in rows)
    assert ort_fp32[1:3] == ["in-process", "FP32"] and ort_int8[1:3] == ["in-process", "INT8"]
    assert c4[1] == "served (front)" and c4[9] == "0.90 (0.80-1.10)"
    assert c4[10:12] == ["16.5", "1.10"]
    assert "FAILED" in c16[0] and "FAILED" not in c4[0]
    assert rate[4] == "10 req/s" and rate[9] == ""  # an offered rate has no ratio


def test_the_plot_is_written(tmp_path: Path) -> None:
    plot(REPORT, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
