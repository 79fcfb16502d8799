"""The FP16 ONNX graph of the FP32 model (PyTorch ``.half()`` is a runner:
export/runners/pytorch.py).

On CPU, ONNX Runtime has no FP16 convolution kernels: it runs the FP16 graph by casting
back to FP32, so that stage only shows the effect of rounding weights to FP16. PyTorch's
``.half()`` really computes in FP16 on CPU: it is the closest stand-in here for TensorRT
FP16 arithmetic, and the one to look at before trusting an engine.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from serve.core.files import atomic_write_bytes


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
