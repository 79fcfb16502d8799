"""Every stage runs through one runner shape: ``runner.logits(pixels)`` gives one row per
image, in order, over any batching, and may be called again; stage names keep the plain
strings parity.json and the bundle have always held."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.checks.stages import REFERENCE, TRITON_STAGES, PixelBatches, StageName
from export.runners.onnxruntime import OnnxRuntimeRunner
from export.runners.triton import TritonRunner
from serve.backend.errors import UsageError


def _channel_means(path: Path) -> Path:
    """An ONNX classifier whose 'logits' are each channel's mean pixel: [N,3,4,4] -> [N,3]."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, axes=[2, 3])]
    graph = helper.make_graph(
        nodes,
        "means",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def test_onnxruntime_runner_answers_every_image_in_order(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, (10, 3, 4, 4)).astype(np.float32)
    expected = pixels.mean(axis=(2, 3))
    runner = OnnxRuntimeRunner(_channel_means(tmp_path / "m.onnx"), StageName.ONNXRUNTIME_FP32)
    for batch in (1, 3, 10):  # uneven batches too; the session is loaded once and reused
        out = runner.logits(PixelBatches.of(pixels, batch=batch))
        assert out.shape == (10, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_stage_names_say_their_runtime_and_precision() -> None:
    assert StageName.ONNXRUNTIME_INT8_TENSORRT.runtime == "onnxruntime"
    assert StageName.ONNXRUNTIME_INT8_TENSORRT.precision == "int8"
    assert StageName.PYTORCH_FP16.runtime == "pytorch" and REFERENCE.precision == "fp32"
    assert [s.runtime for s in TRITON_STAGES] == ["triton-http", "triton-grpc", "triton-image"]
    assert all(s.is_triton and s.precision == "" for s in TRITON_STAGES)
    # plain strings wherever they are written or looked up
    stage = StageName.ONNXRUNTIME_FP16
    assert f"{stage}" == str(stage) == "onnxruntime-fp16" == stage
    assert json.dumps({stage: stage}) == '{"onnxruntime-fp16": "onnxruntime-fp16"}'
    assert {"onnxruntime-fp16": 1}[stage] == 1 and StageName("tensorrt-int8").runtime == "tensorrt"
    with pytest.raises(ValueError):
        StageName("onnxruntime-int4")


def test_the_image_stage_needs_encoded_images() -> None:
    runner = TritonRunner("localhost:1", "m", StageName.TRITON_IMAGE)
    with pytest.raises(UsageError, match="encoded images"):
        runner.logits(PixelBatches.of(np.zeros((1, 3, 4, 4), np.float32)))


def test_a_sample_of_the_images_keeps_each_ones_label_path_and_encoding() -> None:
    pixels = np.arange(7 * 3 * 4 * 4, dtype=np.float32).reshape(7, 3, 4, 4)
    whole = PixelBatches.of(pixels, batch=3, images=[bytes([i]) for i in range(7)])
    whole.labels, whole.paths = np.arange(7) % 2, [f"img{i}.jpg" for i in range(7)]
    sample = whole.take(np.array([5, 0, 6]))
    assert [len(b) for b in sample.batches] == [3] and sample.count == 3
    np.testing.assert_array_equal(np.concatenate(sample.batches), pixels[[5, 0, 6]])
    assert list(sample.labels) == [1, 0, 0] and sample.paths == ["img5.jpg", "img0.jpg", "img6.jpg"]
    assert sample.images == [b"\x05", b"\x00", b"\x06"]
    assert [len(b) for b in whole.take(np.arange(7), batch=2).batches] == [2, 2, 2, 1]
