"""Export stage: ONNX graph, parity gate on every real val image, model repository layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.checks.parity import FP32_GATE, diff_stats, judge
from export.formats.onnx_export import read_metadata
from serve.core.card import ModelCard
from serve.core.files import sha256, versions
from serve.core.model_config import parse_config
from tests.helpers import ROOT, run_cli
from train.models.checkpoint import load_checkpoint

STAGE_KEYS = {
    "name",
    "reference",
    "status",
    "reason",
    "images",
    "top1_agreement",
    "max_abs",
    "mean_abs",
    "median_abs",
    "max_rel",
    "min_required_atol",
}


def test_parity_report_on_every_val_image(trained_run: Path, model_repo: Path) -> None:
    report = json.loads((trained_run / "parity.json").read_text())
    assert report["passed"] is True and report["images"] == 153
    # A meaningful check needs a model that really discriminates the images.
    assert report["reference_top1"] > 0.85
    stage = report["stages"][0]
    assert set(stage) >= STAGE_KEYS
    assert (stage["name"], stage["reference"], stage["status"]) == (
        "onnxruntime-fp32",
        "pytorch-fp32",
        "passed",
    )
    assert stage["images"] == 153
    assert stage["top1_agreement"] == 1.0
    assert stage["max_abs"] <= 1e-3
    assert 0 <= stage["median_abs"] <= stage["max_abs"] == stage["min_required_atol"]


def test_onnx_graph_contract(trained_run: Path, model_repo: Path) -> None:
    path = trained_run / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch",
        3,
        224,
        224,
    ]
    meta = read_metadata(path)
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    card = ModelCard.from_dict(meta["model_card"])  # the card travels inside the graph
    assert card.classes == meta["classes"] == ckpt.card.classes
    assert card.arch == meta["arch"] == ckpt.card.arch
    assert card.preprocessing.geometry_key() == ckpt.card.preprocessing.geometry_key()
    assert card.preprocessing.normalization == "graph"  # the graph normalizes inside
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.uniform(0, 255, (batch, 3, 224, 224)).astype(np.float32)
        assert session.run(None, {"input": x})[0].shape == (batch, 2)


def test_published_repository_layout(model_repo: Path, trained_run: Path) -> None:
    model_dir = model_repo / "antsbees"
    assert versions(model_dir) == [1]
    cfg = parse_config((model_dir / "config.pbtxt").read_text())  # strict protobuf parse
    assert cfg.name == "antsbees" and cfg.backend == "python" and cfg.max_batch_size >= 16
    assert cfg.HasField("dynamic_batching")
    (inp,), (out,) = cfg.input, cfg.output
    assert inp.format == inp.FORMAT_NCHW and list(inp.dims) == [3, 224, 224]
    assert list(out.dims) == [2] and out.label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text() == "ants\nbees\n"
    v1 = model_dir / "1"
    # Triton's python-backend stub runs an isolated interpreter that ignores
    # PYTHONDONTWRITEBYTECODE, so once served, model.py's __pycache__ appears beside it.
    # The python code is serve/backend, whole (model.py is Triton's entry into it).
    published = sorted(p.name for p in v1.iterdir() if p.name != "__pycache__")
    backend = sorted(p.name for p in (ROOT / "serve" / "backend").glob("*.py"))
    assert "model.py" in backend
    assert published == sorted(["model.onnx", "model_card.json", "report", *backend])
    card = json.loads((v1 / "model_card.json").read_text())
    assert sorted(card["files"]) == sorted(["model.onnx", *backend])
    # the version's own report (parity, timings): kept when a later export rewrites runs/
    report = sorted(p.name for p in (v1 / "report").iterdir())
    assert report == ["parity", "parity.json", "parity.md", "parity.png"], report
    assert "timings" in json.loads((v1 / "report" / "parity.json").read_text())
    raw = json.loads((v1 / "model_card.json").read_text())
    card = ModelCard.from_dict(raw)  # the published card follows the schema
    assert card.classes == ["ants", "bees"] and card.version == 1
    assert card.parity is not None and card.parity.passed is True
    assert card.preprocessing.crop == 224 and card.target == "cpu"
    assert card.gflop_per_image and 0.3 < card.gflop_per_image < 1.5  # EfficientNet-Lite0
    assert card.files["model.onnx"] == sha256(v1 / "model.onnx")
    assert card.provenance.checkpoint == "checkpoint.pt"
    assert card.provenance.checkpoint_sha256 == sha256(trained_run / "checkpoint.pt")
    assert (v1 / "model.onnx").read_bytes() == (trained_run / "model.onnx").read_bytes()
    # No machine-local path anywhere in the published card.
    for text in _strings(raw):
        assert not re.search(r"(^|[\s(])(/|\.\./|~/)\w", text), text
        assert str(Path.home()) not in text and str(trained_run) not in text
    # no staging folder or temp file left (the publishing lock file stays)
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")] == [".lock"]


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


@pytest.mark.long
def test_export_publishes_next_version_and_gate_refuses(
    tmp_path: Path, trained_run: Path, model_repo: Path, hymenoptera: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    ckpt = str(trained_run / "checkpoint.pt")
    common = [
        "export",
        "--checkpoint",
        ckpt,
        "--data",
        str(hymenoptera),
        "--model-repository",
        str(repo),
        "--out-dir",
        str(tmp_path / "out"),
        # The FP32 gate is what this test is about; the reduced-precision stages are not.
        "--no-fp16-stages",
        "--no-int8-stage",
        "--no-triton-parity",
    ]
    run_cli(*common)
    assert versions(repo / "antsbees") == [1, 2]
    # A gate tighter than the real ORT-vs-PyTorch difference must refuse to publish.
    proc = run_cli(*common, "--atol", "1e-12", check=False)
    assert proc.returncode == 3
    assert "parity failed, not publishing" in proc.stderr and "max abs diff" in proc.stderr
    assert versions(repo / "antsbees") == [1, 2]
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["passed"] is False and report["stages"][0]["status"] == "failed"
    # The unchanged checkpoint's graph came from the ONNX cache; parity still ran on it.
    assert report["onnx_from_cache"] and "ONNX graph reused" in proc.stderr
    # --force publishes anyway and the model card says so.
    run_cli(*common, "--atol", "1e-12", "--force")
    card = ModelCard.from_dict(
        json.loads((repo / "antsbees" / "3" / "model_card.json").read_text())
    )
    assert card.parity is not None and card.parity.forced is True


def test_parity_judge_thresholds() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(50, 10)).astype(np.float32)
    assert judge("a", "b", ref, ref).status == "passed"
    near = ref + 5e-4
    assert judge("a", "b", ref, near).status == "passed"
    far = ref + 2e-3
    stage = judge("a", "b", ref, far)
    assert stage.status == "failed" and "max abs diff" in stage.reason
    flipped = ref.copy()
    flipped[0] = -flipped[0]
    stage = judge("a", "b", ref, flipped, FP32_GATE)
    assert stage.status == "failed" and "top-1 agreement" in stage.reason
    stats = diff_stats(ref, near)
    assert stats["max_abs"] == pytest.approx(5e-4, rel=1e-3)
    with pytest.raises(ValueError, match="shape mismatch"):
        diff_stats(ref, ref[:, :5])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_stage_with_a_non_finite_output_fails_naming_it(bad: float) -> None:
    """NaN compares false with every tolerance: without its own check such a stage would
    pass the element-wise gate. Either gate fails it, naming the image and the output."""
    from export.checks.parity import ACCURACY_GATE

    rng = np.random.default_rng(2)
    ref = rng.normal(size=(20, 2)).astype(np.float32)
    out = ref.copy()
    out[7, 1] = out[9, 0] = bad
    names = [f"val/img{i}.jpg" for i in range(20)]
    labels = ref.argmax(1)
    for gate in (FP32_GATE, ACCURACY_GATE):
        stage = judge("s", "pytorch-fp32", ref, out, gate, True, labels, ["ants", "bees"], names)
        assert stage.status == "failed" and stage.nonfinite == 2
        assert "2 non-finite output value(s), the first: image val/img7.jpg, output bees" in (
            stage.reason
        )
        assert all(np.isfinite(v) for v in (stage.max_abs, stage.median_rel)), stage
        json.loads(json.dumps(stage.to_dict(), allow_nan=False))  # parity.json stays JSON
    stage = judge("s", "onnxruntime-fp32", out, ref, FP32_GATE, names=names)
    assert stage.status == "failed" and "non-finite reference (onnxruntime-fp32)" in stage.reason


def test_export_missing_checkpoint_is_clear(tmp_path: Path) -> None:
    proc = run_cli("export", "--checkpoint", str(tmp_path / "none.pt"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
