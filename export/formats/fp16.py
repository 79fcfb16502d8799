"""FP16 variants of the FP32 model: an FP16 ONNX graph and PyTorch ``.half()``.

On CPU, ONNX Runtime has no FP16 convolution kernels: it runs the FP16 graph by casting
back to FP32, so that stage only shows the effect of rounding weights to FP16. PyTorch's
``.half()`` really computes in FP16 on CPU: it is the closest stand-in here for TensorRT
FP16 arithmetic, and the one to look at before trusting an engine.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from export.checks.stage_outputs import PixelBatches
from serve.core.files import atomic_write_bytes
from train.models.checkpoint import Checkpoint, model_from_checkpoint
from train.run.progress import progress


def first_and_last_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the first Conv and the last Gemm/MatMul (to keep in FP32 if parity needs it)."""
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return [n.name for n in (compute[:1] + compute[-1:]) if n.name]


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    keep_first_last_fp32: bool = False,
    node_block_list: list[str] | None = None,
) -> onnx.ModelProto:
    """FP32 ONNX -> FP16 weights and activations, FP32 inputs/outputs kept (Cast at the
    edges), checked with ``onnx.checker`` and written atomically. Nodes named in
    ``node_block_list`` (and the first/last compute nodes when asked) stay in FP32."""
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    block = first_and_last_nodes(model) if keep_first_last_fp32 else []
    block += [n for n in node_block_list or [] if n not in block]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-initializer "value truncated" notices
        fp16 = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=block)
    fp16.metadata_props.add(key="precision", value="fp16")
    if block:
        fp16.metadata_props.add(key="fp32_nodes", value=",".join(block))
    onnx.checker.check_model(fp16, full_check=True)
    atomic_write_bytes(Path(dst), fp16.SerializeToString())
    return fp16


def _fastest_layout(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """CPU FP16 kernels differ a lot by memory layout and arch: time both on one batch
    and return True when channels_last is faster."""
    times = []
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        t = time.perf_counter()
        model(x.contiguous(memory_format=fmt))
        times.append(time.perf_counter() - t)
    return times[1] < times[0]


@torch.no_grad()
def pytorch_fp16_logits(
    ckpt: Checkpoint, pixels: PixelBatches, limit: int = 0
) -> tuple[np.ndarray, int]:
    """The trained model in FP16 (``.half()``), inputs normalized in FP32 then cast.

    Returns the logits (as float32) of the first ``limit`` images of ``pixels`` (all when
    0) and how many images that was; the export passes a stratified sample when the stage
    is advisory (CPU FP16 is slow), every image when it gates.
    """
    model = model_from_checkpoint(ckpt).half().eval()
    pre = ckpt.card.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    n = pixels.count if limit <= 0 else min(limit, pixels.count)
    outs, done = [], 0
    layout: bool | None = None
    for batch in progress(pixels.batches, desc="pytorch fp16"):
        if done >= n:
            break
        x = ((torch.from_numpy(batch[: n - done]) / 255 - mean) / std).half()
        if layout is None:
            layout = _fastest_layout(model, x[:2])
            model.to(memory_format=torch.channels_last if layout else torch.contiguous_format)
        if layout:
            x = x.contiguous(memory_format=torch.channels_last)
        outs.append(model(x).float().numpy())
        done += len(x)
    return np.concatenate(outs), n
