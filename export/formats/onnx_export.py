"""Checkpoint -> ONNX graph that takes 0..255 RGB pixels and normalizes inside; the model
card (normalization placement ``graph``) travels in the graph's metadata."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.formats.onnx_cache import OnnxCache, cache_key
from serve.core.card import ModelCard
from serve.core.files import atomic_write_bytes
from serve.core.names import INPUT_NAME, OUTPUT_NAME
from train.models.archs import build_model, drop_aux
from train.models.checkpoint import Checkpoint, model_from_checkpoint

OPSET = 18


class PixelClassifier(nn.Module):
    """``model((x / 255 - mean) / std)`` for float 0..255 NCHW RGB pixels ``x``.

    The scaling is folded into one multiply-add: ``x * (1 / (255 std)) - mean / std``.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    scale: torch.Tensor  # buffers (register_buffer)
    shift: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale - self.shift)


def pixel_model(ckpt: Checkpoint) -> PixelClassifier:
    """The checkpoint's model wrapped to take 0..255 pixels (eval mode), without
    training-only auxiliary classifiers (GoogLeNet's): one output, no unused weights."""
    pre = ckpt.card.preprocessing
    model = drop_aux(model_from_checkpoint(ckpt))
    return PixelClassifier(model, pre.mean, pre.std).eval()


def exported_card(ckpt: Checkpoint) -> ModelCard:
    """The checkpoint's card as the exported graph sees it: it normalizes inside."""
    card = ckpt.card
    return card.replace(
        preprocessing=dataclasses.replace(card.preprocessing, normalization="graph")
    )


def model_gflops(ckpt: Checkpoint) -> float:
    """FLOPs per image of the checkpoint's network (torch's FlopCounterMode), GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    card = ckpt.card
    model = build_model(card.arch, card.num_classes, **card.arch_options).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *card.input.shape))
    return counter.get_total_flops() / 1e9


def metadata(card: ModelCard) -> dict[str, str]:
    """ONNX metadata_props: the model card (and its most-read fields), as JSON strings."""
    return {
        "model_card": json.dumps(card.to_dict()),
        "model_name": card.name,
        "arch": card.arch,
        "classes": json.dumps(card.classes),
        "preprocessing": json.dumps(dataclasses.asdict(card.preprocessing)),
        "input": json.dumps(dataclasses.asdict(card.input)),
        "output": json.dumps(dataclasses.asdict(card.output)),
        "torch_version": str(torch.__version__),
    }


@dataclasses.dataclass
class ExportedOnnx:
    """What :func:`export_onnx` wrote: the graph, and whether it came from the cache."""

    proto: onnx.ModelProto
    cached: bool = False
    key: str = ""


def trace_onnx(ckpt: Checkpoint, *, opset: int = OPSET) -> onnx.ModelProto:
    """``torch.onnx.export`` (dynamo) of the pixel model with a dynamic batch axis named
    ``batch``; no metadata."""
    model = pixel_model(ckpt)
    c, h, w = ckpt.card.input.shape
    example = torch.rand(2, c, h, w) * 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    # Name the batch axis the same way Triton/TensorRT tools expect.
    for value in (*proto.graph.input, *proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = "batch"
    del proto.metadata_props[:]
    proto.producer_name = "trainserve.export"
    return proto


def export_onnx(
    ckpt: Checkpoint,
    path: str | Path,
    *,
    opset: int = OPSET,
    cache: OnnxCache | None = None,
    checkpoint_sha256: str = "",
) -> ExportedOnnx:
    """Export with a dynamic batch axis, attach metadata, check, and write atomically.

    With a ``cache`` and the checkpoint file's sha256, an unchanged checkpoint reuses the
    graph exported before (see :mod:`export.formats.onnx_cache`); the metadata is always fresh."""
    key = cache_key(checkpoint_sha256, opset) if cache and checkpoint_sha256 else ""
    proto = cache.get(key) if cache and key else None
    cached = proto is not None
    if proto is None:
        proto = trace_onnx(ckpt, opset=opset)
        if cache and key:
            cache.put(key, proto)
    for k, value in metadata(exported_card(ckpt)).items():
        proto.metadata_props.add(key=k, value=value)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(Path(path), proto.SerializeToString())
    return ExportedOnnx(proto, cached, key)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported model, JSON values decoded."""
    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    return out
