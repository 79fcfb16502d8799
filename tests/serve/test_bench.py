"""The serving benchmark harness writes the documented JSON and plot (a short sweep)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli

RESULT_KEYS = {
    "backend",
    "input",
    "batch",
    "concurrency",
    "throughput",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "errors",
}


def test_bench_short_sweep(model_repo: Path, trained_run: Path, tmp_path: Path) -> None:
    run_cli(
        "export",
        "bench",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--model",
        "antsbees",
        "--model-repository",
        str(model_repo),
        "--concurrency",
        "1,2",
        "--protocols",
        "grpc,grpc-shm,http",
        "--inputs",
        "tensor,raw",
        "--window",
        "0.5",
        "--max-seconds",
        "3",
        "--out",
        str(tmp_path),
    )
    report = json.loads((tmp_path / "antsbees-latest.json").read_text())
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["peak_gflops_fp32"] > 1 and machine["cpu"]
    assert report["gflop_per_image"] > 0.1
    backends = {(r["backend"], r["input"]) for r in report["results"]}
    assert {
        ("onnxruntime", "tensor"),
        ("pytorch", "tensor"),
        ("triton-grpc", "tensor"),
        ("triton-grpc", "raw"),
        ("triton-grpc-shm", "tensor"),
        ("triton-http", "tensor"),
        ("triton-http", "raw"),
    } <= backends
    for r in report["results"]:
        assert set(r) >= RESULT_KEYS and r["errors"] == 0 and r["throughput"] > 0
        assert r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        if r["backend"].startswith("triton"):
            assert r["ratio_to_onnxruntime"] > 0 and r["server"]["avg_executed_batch"] >= 1
    assert "tensorrt" in report["skipped"]  # no engine in a CPU repository
    assert (tmp_path / "antsbees-latest.png").read_bytes().startswith(b"\x89PNG")
    assert len(list(tmp_path.glob("antsbees-2*.json"))) == 1
