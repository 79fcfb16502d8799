"""Every exported ONNX is parsed and built by a real TensorRT (NVIDIA's
TensorRT for RTX, whose builder runs without a GPU), strongly typed: the engine's
precision is the graph's. Running engines needs a GPU and stays skipped here."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from export.formats.fp16 import convert_fp16
from export.formats.tensorrt_engine import EngineProfile
from export.formats.tensorrt_rtx import (
    DEFAULT_RTX_TARGETS,
    RtxBuild,
    import_rtx,
    network_layers,
    parse_network,
    parse_targets,
    rtx_build,
)
from export.pipeline.config import ExportConfig
from export.pipeline.job import ExportJob
from export.triton.config import ServingConfig
from serve.core.names import INPUT_NAME

BUILD_KEYS = {
    "onnx",
    "precision",
    "builder",
    "compute_capabilities",
    "status",
    "reason",
    "engine_bytes",
    "seconds",
    "layers",
    "layer_types",
}


def test_every_exported_precision_is_built(trained_run: Path, model_repo: Path) -> None:
    """`make export` (the session export): FP32 and FP16 ONNX each parsed and built by
    TensorRT-RTX for 8.6, 8.9 and 12.0, recorded in parity.json and parity.md; the engines
    stay in the run folder (no target serves them). INT8 is quantized only where it is
    published (test_int8 builds its TensorRT flavour)."""
    import tensorrt_rtx

    report = json.loads((trained_run / "parity.json").read_text())
    builds = {b["precision"]: b for b in report["tensorrt_builds"]}
    assert set(builds) == {"fp32", "fp16"}
    for b in builds.values():
        assert set(b) == BUILD_KEYS
        assert b["status"] == "built", b["reason"]
        assert b["reason"] == ""
        assert b["builder"] == f"tensorrt_rtx {tensorrt_rtx.__version__}"
        assert b["compute_capabilities"] == list(DEFAULT_RTX_TARGETS)
        engine = trained_run / "tensorrt_rtx" / f"{Path(b['onnx']).stem}.engine"
        assert engine.stat().st_size == b["engine_bytes"] > 0
        assert b["layers"] == sum(b["layer_types"].values()) > 0
    assert builds["fp32"]["onnx"] == "model.onnx"
    assert set(builds["fp32"]["layer_types"]) <= {"FLOAT", "INT32", "INT64", "BOOL"}
    fp16 = builds["fp16"]["layer_types"]
    assert fp16["HALF"] > fp16.get("FLOAT", 0)  # FP16 inside, FP32 only at the edges
    # The engines are not published: the CPU target serves ONNX Runtime.
    assert not list(model_repo.rglob("*.engine"))
    md = (trained_run / "parity.md").read_text()
    assert "## TensorRT-RTX builds" in md and "model.onnx | fp32" in md
    # Running an engine needs a GPU: that stage is still skipped, with the reason.
    (trt_stage,) = [s for s in report["stages"] if s["name"] == "tensorrt-fp16"]
    assert trt_stage["status"] == "skipped" and "GPU" in trt_stage["reason"]


def _int32_bias_graph(path: Path) -> str:
    """A graph TensorRT's parser refuses for the reason ORT's default INT8 graph was
    refused: a DequantizeLinear of an INT32 tensor (ORT quantizes biases to INT32)."""
    bias = helper.make_tensor("bias_q", TensorProto.INT32, [4], [1, 2, 3, 4])
    scale = helper.make_tensor("bias_scale", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("DequantizeLinear", ["bias_q", "bias_scale"], ["bias"], name="bias_DQ"),
        helper.make_node("Add", [INPUT_NAME, "bias"], ["logits"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "int32_bias",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[bias, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)  # valid ONNX: only TensorRT refuses it
    onnx.save(model, str(path))
    return "bias_DQ"


def test_unparsable_graph_fails_with_the_parsers_message(tmp_path: Path) -> None:
    node = _int32_bias_graph(tmp_path / "bad.onnx")
    engine = tmp_path / "bad.engine"
    b = rtx_build(tmp_path / "bad.onnx", "int8", ("8.6",), EngineProfile(), INPUT_NAME, [4], engine)
    assert set(b.to_dict()) == BUILD_KEYS
    assert b.status == "failed" and b.engine_bytes is None and not engine.exists()
    # The parser's own first error: the node and what it refuses.
    assert b.reason.startswith(f"{node}: ") and "Int32" in b.reason, b.reason


def test_fp16_network_is_fp16_except_where_the_fallback_kept_fp32(
    trained_run: Path, model_repo: Path, tmp_path: Path
) -> None:
    """The strongly typed network of an FP16 graph with nodes kept in FP32 (the precision
    fallback's own conversion, ``node_block_list``): those convolutions are FP32, every
    other convolution FP16, counted from the parsed network."""
    src = trained_run / "model.onnx"
    convs = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"]
    kept = convs[:2] + convs[-1:]
    dst = tmp_path / "model_fp16.onnx"
    convert_fp16(src, dst, node_block_list=kept)
    _, network, _ = parse_network(import_rtx(), dst)
    conv_types = {
        layer["name"]: layer["dtype"]
        for layer in network_layers(network)
        if layer["type"] == "CONVOLUTION"
    }
    assert sorted(conv_types) == sorted(convs)  # one layer per ONNX Conv, same names
    assert {n for n, t in conv_types.items() if t == "FLOAT"} == set(kept)
    assert {n for n, t in conv_types.items() if t == "HALF"} == set(convs) - set(kept)


def test_targets_are_checked() -> None:
    assert parse_targets("8.6, 12.0") == ("8.6", "12.0")
    assert parse_targets(["8.6", "8.9,8.6"]) == ("8.6", "8.9")
    assert parse_targets(["none"]) == ()
    with pytest.raises(ValueError, match="'sm86': expected MAJOR.MINOR"):
        parse_targets("sm86")


def test_unknown_compute_capability_is_a_failed_build_naming_the_known_ones(
    tmp_path: Path,
) -> None:
    node = _int32_bias_graph(tmp_path / "g.onnx")
    assert node
    b = rtx_build(tmp_path / "g.onnx", "fp32", ("9.0",), EngineProfile(), INPUT_NAME, [4])
    assert b.status == "failed"
    assert "cannot target compute capability 9.0" in b.reason and "8.6" in b.reason


@pytest.mark.parametrize(
    ("target", "precision", "failed", "passes"),
    [
        ("gpu", "fp32", "fp16", False),  # TARGET=gpu serves the FP16 engine
        ("gpu", "int8", "int8", False),
        ("gpu", "int8", "fp16", True),  # not what is served
        ("cpu", "int8", "int8", True),  # CPU targets: a warning, not a failed gate
    ],
)
def test_a_failed_build_of_what_gpu_serves_fails_the_gate(
    target: str, precision: str, failed: str, passes: bool
) -> None:
    from export.pipeline.config import PrecisionConfig

    cfg = ExportConfig(
        checkpoint="x.pt",
        serving=ServingConfig(target=target, gpu_backend="onnxruntime"),
        precision=PrecisionConfig(precision=precision),
    )
    job = ExportJob(cfg, ckpt=None, name="m", data="d", out_dir=Path("."))  # type: ignore[arg-type]
    builds = [
        RtxBuild("model.onnx", p, "tensorrt_rtx", ["8.6"], status="built")
        for p in ("fp32", "fp16", "int8")
        if p != failed
    ] + [RtxBuild(f"model_{failed}.onnx", failed, "tensorrt_rtx", ["8.6"], reason="no")]
    assert (not job.failed_required_builds(builds)) is passes


def test_export_refuses_an_unknown_target_before_any_work(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    proc = run_cli(
        "export",
        "--checkpoint",
        str(tmp_path / "missing.pt"),
        "--trt-rtx-targets",
        "8.6",
        "9.0",
        check=False,
    )
    assert proc.returncode != 0
    assert "cannot target compute capability 9.0" in proc.stderr  # before the checkpoint
