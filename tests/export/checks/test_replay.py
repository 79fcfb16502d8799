"""The parity bundle an export leaves: replayed elsewhere from the bundle alone, a
tampered copy caught, a broken layer localized, every runtime swept across batches."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.checks.bundle import Bundle, exact_uint8
from tests.helpers import PY, ROOT

# A replay on "another machine": the bundle copied away, run from elsewhere, with torch
# made unimportable (sys.modules['torch'] = None) and no dataset path that resolves.
NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.path.insert(0, {root!r}); "
    "from export.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def replay(bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-c", NO_TORCH.format(root=str(ROOT)), "replay", str(bundle), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def localize(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m export localize`` of the FP16 stage on its 4 worst images."""
    return subprocess.run(
        [PY, "-m", "export", "localize", str(bundle), "--stage", "onnxruntime-fp16"]
        + ["--images", "4", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def carried(trained_run: Path, model_repo: Path, tmp_path: Path) -> Path:
    """The export's bundle, copied to a folder of its own."""
    dst = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(trained_run / "parity", dst)
    return dst


def test_the_export_writes_a_bundle_and_its_commands(trained_run: Path, model_repo: Path):
    bundle = Bundle.load(trained_run)
    assert bundle.meta["images"] == 153 and bundle.classes == ["ants", "bees"]
    pixels, labels, names = bundle.inputs()
    assert pixels.shape == (153, 3, 224, 224) and len(labels) == len(names) == 153
    with np.load(bundle.path / "inputs.npz") as z:
        assert z["pixels"].dtype == np.uint8  # 8-bit values, stored exactly
    assert bundle.stage("onnxruntime-fp32").model == "model.onnx"
    for name in ("pytorch-fp32", "onnxruntime-fp32", "triton-http", "triton-grpc", "triton-image"):
        logits, indices = bundle.outputs(name)
        assert logits.shape == (153, 2) and indices is None
    # the FP32 stage's saved logits are the ones the report judged
    report = json.loads((trained_run / "parity.json").read_text())
    saved = bundle.outputs("onnxruntime-fp32")[0]
    ref = bundle.outputs("pytorch-fp32")[0]
    stage = next(s for s in report["stages"] if s["name"] == "onnxruntime-fp32")
    assert np.abs(saved - ref).max() == pytest.approx(stage["max_abs"], rel=1e-5)
    assert set(report["bundle"]["replay"]) >= {"onnxruntime-fp32", "triton-grpc"}
    md = (trained_run / "parity.md").read_text()
    assert "python -m export replay" in md and "--stage triton-image --url" in md
    # the published version keeps its own bundle
    version_bundle = model_repo / "antsbees" / "1" / "report" / "parity"
    assert Bundle.load(version_bundle).outputs("onnxruntime-fp32")[0].tolist() == saved.tolist()


def test_a_carried_bundle_replays_without_torch_or_the_dataset(carried: Path, server, tmp_path):
    """ONNX Runtime from the bundle's own model file; the Triton stages against a server."""
    proc = replay(carried, "--stage", "onnxruntime-fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxruntime-fp32: PASSED" in proc.stdout
    for stage, url in (
        ("triton-http", server.http_url),
        ("triton-grpc", server.grpc_url),
        ("triton-image", server.grpc_url),
    ):
        proc = replay(carried, "--stage", stage, "--url", url, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{stage}: PASSED" in proc.stdout
    # a stage that needs the checkpoint says so instead of importing torch
    proc = replay(carried, "--stage", "pytorch-fp16", cwd=tmp_path)
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr
    # a bundle that names a file outside itself is refused, nothing read
    meta = json.loads((carried / "bundle.json").read_text())
    meta["stages"][1]["model"] = "../../model.onnx"
    (carried / "bundle.json").write_text(json.dumps(meta))
    proc = replay(carried, "--stage", meta["stages"][1]["name"], cwd=tmp_path)
    assert proc.returncode == 2 and "not a file in it" in proc.stderr


def test_a_changed_saved_output_fails_its_replay_naming_the_image(carried: Path, tmp_path):
    path = carried / "onnxruntime-fp32.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["logits"][17, 1] += 0.25
    np.savez_compressed(path, **arrays)
    name = Bundle.load(carried).inputs()[2][17]
    proc = replay(carried, "--stage", "onnxruntime-fp32", cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "onnxruntime-fp32: FAILED" in proc.stdout
    assert f"image {name}, output bees" in proc.stdout


def test_a_broken_fp16_layer_is_localized_to_that_layer(carried: Path, tmp_path):
    """One convolution's weights scaled by 1.5 in the FP16 graph: the first layer over
    tolerance is that convolution, and every layer before it is within tolerance."""
    model = onnx.load(str(carried / "model_fp16.onnx"))
    weights = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights]
    broken = convs[len(convs) // 2]
    w = weights[broken.input[1]]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.5, w.name))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    out = tmp_path / "loc"
    proc = localize(carried, "--model", str(tmp_path / "broken.onnx"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "localize-onnxruntime-fp16.json").read_text())
    first = report["first_over_tolerance"]
    assert first is not None and first["node"] == (broken.name or broken.output[0]), first
    assert first["tensor"] == broken.output[0] and first["rel_rms"] > 0.3
    before = [x for x in report["layers"] if x["index"] < first["index"]]
    assert before and all(x["rel_rms"] <= report["tolerance"] for x in before)
    assert (out / "localize-onnxruntime-fp16.png").stat().st_size > 0
    assert broken.output[0] in (out / "localize-onnxruntime-fp16.md").read_text()
    # the FP16 graph as exported has no layer over tolerance
    good = localize(carried, "--out", str(tmp_path / "ok"))
    assert good.returncode == 0, good.stderr
    ok = json.loads((tmp_path / "ok" / "localize-onnxruntime-fp16.json").read_text())
    assert ok["first_over_tolerance"] is None and len(ok["layers"]) > 20


def test_the_batch_sweep_has_every_runtime_and_batch(trained_run: Path, model_repo, tmp_path):
    proc = subprocess.run(
        [PY, "-m", "export", "profile", str(trained_run), "--batches", "1,2,4"]
        + ["--seconds", "0.05", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "antsbees-batch-sweep.json").read_text())
    assert set(report["runtimes"]) == {"pytorch-fp32", "onnxruntime-fp32", "onnxruntime-fp16"}
    for r in report["runtimes"].values():
        assert [row["batch"] for row in r["rows"]] == [1, 2, 4]
        assert all(row["images_per_s"] > 0 and row["runs"] >= 3 for row in r["rows"])
        assert r["saturates_at"] in (1, 2, 4)
    assert (tmp_path / "antsbees-batch-sweep.png").stat().st_size > 0


def test_pixels_that_are_not_8_bit_are_refused():
    assert exact_uint8([np.array([[0.0, 255.0]])]).dtype == np.uint8
    with pytest.raises(ValueError, match="8-bit"):
        exact_uint8([np.array([[0.5]])])


def test_the_localize_ranking_puts_the_node_that_adds_error_first(tmp_path: Path):
    """Three convolutions in a row; the middle one adds the most error layer by layer
    (its output's error minus its input's), so the fallback's second ranking tries it
    first; a node the localization did not see comes last."""
    from onnx import TensorProto, helper

    from export.checks.localize import LayerError, Localization
    from export.pipeline.precision_fallback import localize_ranking

    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", [a, "w"], [b], name=n)
        for n, a, b in (
            ("c1", "x", "t1"),
            ("c2", "t1", "t2"),
            ("c3", "t2", "t3"),
            ("c4", "t3", "y"),
        )
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])],
        [w],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    loc = Localization("s", "m", "r", 4, 0.05)
    for i, (tensor, err) in enumerate((("t1", 0.01), ("t2", 0.31), ("t3", 0.35))):
        loc.layers.append(LayerError(i, tensor, f"c{i + 1}", "Conv", err, err, 1.0))
    assert localize_ranking(loc, ["c1", "c2", "c3", "c4"], path) == ["c2", "c3", "c1", "c4"]
    assert localize_ranking(None, ["c1"], path) == []
