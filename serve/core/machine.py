"""What machine a benchmark ran on (torch-free): CPU model and flags, cores, the
measured FP32 GEMM peak with ONNX Runtime's MLAS (the library that serves here)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c", "fma")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD features that matter for FP32/INT8 kernels, as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return []


def gemm_gflops_onnxruntime(seconds: float = 3.0, n: int = 2048) -> float:
    """FP32 GEMM throughput of ONNX Runtime (all threads), GFLOP/s."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])],
        "gemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "AB"],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return timed_gflops(lambda: session.run(None, {"A": a, "B": b}), 2 * n**3, seconds)


def timed_gflops(fn: Any, flops: float, seconds: float) -> float:
    """Run ``fn`` (one warm-up call) repeatedly for ``seconds``; GFLOP/s."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
    return flops * reps / (time.perf_counter() - t0) / 1e9


def machine_info(gemm: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``machine`` block of a benchmark report."""
    gemm = {k: round(v, 1) for k, v in (gemm or {}).items()}
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "peak_gflops_fp32": max(gemm.values()) if gemm else None,
        "gemm_gflops": gemm,
        "python": platform.python_version(),
    }
