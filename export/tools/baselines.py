"""In-process baselines that need torch or TensorRT, measured with the same load loop as
the Triton rows (``serve.tools.loadgen``): PyTorch eager, a bare TensorRT engine, the GEMM
peak of torch's BLAS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from serve.core.machine import timed_gflops
from serve.tools.bench_inputs import costed_level
from serve.tools.loadgen import Level, level, measure
from train.models.checkpoint import Checkpoint


def gemm_gflops_torch(seconds: float = 3.0, n: int = 2048) -> float:
    """FP32 GEMM throughput of torch's BLAS (all threads), GFLOP/s."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    return timed_gflops(lambda: a @ b, 2 * n**3, seconds)


def pytorch_baseline(
    ckpt: Checkpoint, pixels: np.ndarray, batch: int, window: float, cap: float
) -> Level:
    """The exported network as PyTorch eager (0..255 pixels in, normalization inside)."""
    from export.formats.onnx_export import pixel_model

    model = pixel_model(ckpt)
    x = torch.from_numpy(pixels[:batch])

    def once() -> None:
        with torch.inference_mode():
            model(x)

    return costed_level("pytorch", "tensor", batch, once, window, cap, "fp32")


def tensorrt_baseline(
    plan: Path, pixels: np.ndarray, batch: int, window: float, cap: float
) -> Level | str:
    """The bare engine (Polygraphy TrtRunner) where the version holds one and TensorRT + a
    GPU are here; otherwise the reason, recorded as skipped."""
    if not plan.is_file():
        return f"no TensorRT engine ({plan} missing; a CPU repository has none)"
    try:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from export.formats.tensorrt_engine import check_compatible

        meta = check_compatible(plan)
    except Exception as e:  # noqa: BLE001 - TensorRT missing, another GPU: the reason is the row
        return f"cannot run {plan}: {e}"
    x = pixels[:batch]
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan)))) as runner:
        m = measure(lambda _: runner.infer({meta["input"]["name"]: x}), 1, window, cap)
    return level("tensorrt", "tensor", batch, 1, m, meta.get("precision", "fp16"))
