"""The accuracy gate for reduced precision, INT8 ONNX published and served by the
real Triton, and the automatic precision fallback on an honestly failing case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.checks.parity import AccuracyGate, judge
from export.formats.int8 import Calibration
from export.formats.tensorrt_engine import tensorrt_status
from export.pipeline.config import ExportConfig, PrecisionConfig
from export.pipeline.release import run_export
from export.triton.config import ServingConfig
from serve.core.card import ModelCard
from serve.core.files import sha256, versions
from tests.helpers import run_cli

TRT_OK, TRT_WHY = tensorrt_status()


def _logits(pred: np.ndarray, classes: int = 2) -> np.ndarray:
    out = np.zeros((len(pred), classes), np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_accuracy_gate_counts_images_and_points() -> None:
    gate = AccuracyGate()
    assert gate.allowed_drop(153) == pytest.approx(1 / 153)  # one image on a small set
    assert gate.allowed_drop(1000) == 0.005  # 0.5 points otherwise
    assert AccuracyGate(small_set_drop_images=0).allowed_drop(153) == 0.005
    labels = np.array([0, 1] * 50)
    ref = _logits(labels)  # 100% correct
    one_wrong = labels.copy()
    one_wrong[0] = 1
    two_wrong = one_wrong.copy()
    two_wrong[1] = 0
    classes = ["a", "b"]
    stage = judge("x", "fp32", ref, _logits(one_wrong), AccuracyGate(0.99), True, labels, classes)
    assert stage.status == "passed" and stage.accuracy_drop == pytest.approx(0.01)
    assert stage.per_class_accuracy == {"a": 0.98, "b": 1.0} and stage.gate == "accuracy"
    stage = judge("x", "fp32", ref, _logits(two_wrong), AccuracyGate(0.99), True, labels, classes)
    assert stage.status == "failed" and "2 flips break a correct reference answer" in stage.reason
    assert "2.00 points below" in stage.reason  # two images of 100: more than one image
    stage = judge("x", "fp32", ref, _logits(two_wrong), AccuracyGate(0.99), True, labels * 0 + 1)
    assert "top-1 agreement" not in stage.reason  # 98% meets the small-set floor


def test_small_set_gate_judges_flips_by_what_they_do() -> None:
    """The issue's case: 153 val images, FP32 right on 147; INT8 flips 2, both to the
    correct label (97.39% vs 96.08%). 99.5% agreement allowed no flip; now flips that fix
    pass, flips that break count against the one image allowed, and a 98% floor stays."""
    labels = np.array([0] * 70 + [1] * 83)
    fp32_pred = labels.copy()
    wrong = np.array([0, 1, 2, 3, 80, 81])  # FP32 wrong on 6: 147/153 = 96.08%
    fp32_pred[wrong] = 1 - labels[wrong]
    ref, gate, classes = _logits(fp32_pred), AccuracyGate(), ["ants", "bees"]

    def flipped(*idx: int) -> np.ndarray:
        pred = fp32_pred.copy()
        pred[list(idx)] = 1 - pred[list(idx)]
        return _logits(pred)

    fixes_two = judge("int8", "fp32", ref, flipped(0, 80), gate, True, labels, classes)
    assert fixes_two.status == "passed", fixes_two.reason
    assert (fixes_two.flips_fix, fixes_two.flips_break) == (2, 0)
    assert fixes_two.accuracy == pytest.approx(149 / 153) and fixes_two.top1_agreement < 0.995
    assert fixes_two.thresholds["agreement_floor"] == 0.98
    one_each = judge("int8", "fp32", ref, flipped(1, 10), gate, True, labels, classes)
    assert one_each.status == "passed" and one_each.accuracy_drop == 0
    breaks_two = judge("int8", "fp32", ref, flipped(10, 11, 0, 80), gate, True, labels, classes)
    assert breaks_two.status == "failed"  # fixes never buy breaks
    assert "2 flips break a correct reference answer (allowed 1" in breaks_two.reason
    breaks_two_net = judge("int8", "fp32", ref, flipped(10, 11), gate, True, labels, classes)
    assert "points below" in breaks_two_net.reason  # 2 images > the 1 allowed
    reshuffle = judge("int8", "fp32", ref, flipped(0, 1, 2, 80), gate, True, labels, classes)
    assert reshuffle.status == "failed" and "top-1 agreement 97.3856% < 98.00%" in (
        reshuffle.reason
    )
    # a large set keeps the plain rule: 99.5% agreement, 0.5 points
    big = np.tile(labels, 2)
    big_ref = _logits(np.tile(fp32_pred, 2))
    big_out = _logits(np.concatenate([flipped(0).argmax(1), fp32_pred]))
    stage = judge("int8", "fp32", big_ref, big_out, gate, True, big, classes)
    assert stage.status == "passed" and stage.thresholds["agreement_floor"] == 0.995
    big_out = _logits(np.concatenate([flipped(0, 80).argmax(1), fp32_pred]))
    stage = judge("int8", "fp32", big_ref, big_out, gate, True, big, classes)
    assert stage.status == "failed" and "< 99.50%" in stage.reason


def _int8_export(run: Path, out: Path, repo: Path, *extra: str, check: bool = True):
    return run_cli(
        "export",
        "--checkpoint",
        str(run / "checkpoint.pt"),
        "--out-dir",
        str(out),
        "--model-repository",
        str(repo),
        "--precision",
        "int8",
        "--calibration-count",
        "32",
        "--no-fp16-stages",
        *extra,
        check=check,
    )


# Stricter than INT8 can meet unaided: every val image must agree and no accuracy may be
# lost (not even the one image the default allows on a small set).
STRICT = (
    "--min-agreement",
    "1.0",
    "--small-set-min-agreement",
    "1.0",
    "--max-accuracy-drop",
    "0",
    "--small-set-drop-images",
    "0",
)


@pytest.mark.long
def test_int8_fails_a_strict_gate_without_fallback(trained_run: Path, tmp_path: Path) -> None:
    proc = _int8_export(
        trained_run,
        tmp_path / "out",
        tmp_path / "repo",
        *STRICT,
        "--no-precision-fallback",
        "--no-triton-parity",
        check=False,
    )
    assert proc.returncode == 3 and "onnxruntime-int8: top-1 agreement" in proc.stderr
    assert not versions(tmp_path / "repo" / "antsbees")
    stage = next(
        s
        for s in json.loads((tmp_path / "out" / "parity.json").read_text())["stages"]
        if s["name"] == "onnxruntime-int8"
    )
    assert stage["gating"] is True and stage["status"] == "failed"
    assert stage["fallback"] == {"status": "disabled (--no-precision-fallback)"}
    # the failed stage was localized by itself: its graph layer by layer against FP32
    localized = stage["localized"]
    assert localized["report"] == "localize-onnxruntime-int8.md" and localized["images"] == 8
    layers = json.loads((tmp_path / "out" / "localize-onnxruntime-int8.json").read_text())
    assert len(layers["layers"]) > 20 and layers["tolerance"] == localized["tolerance"]
    assert "Layer by layer: onnxruntime-int8" in (tmp_path / "out" / "parity.md").read_text()


@pytest.mark.long
def test_int8_speed_gate_refuses_a_slow_int8(trained_run: Path, tmp_path: Path) -> None:
    """`make export PRECISION=int8` publishes INT8 only when it is measured faster than
    FP32 by --min-int8-speedup: an INT8 that passes the accuracy gate (a lax one here, so
    no fallback runs) but not a 1000x speed bar is refused with the numbers, exit 3,
    nothing published; the speed verdict is printed and in the report."""
    out, repo = tmp_path / "out", tmp_path / "repo"
    lax = ("--small-set-min-agreement", "0.5", "--small-set-drop-images", "20")
    proc = _int8_export(
        trained_run,
        out,
        repo,
        *lax,
        "--min-int8-speedup",
        "1000",
        "--no-triton-parity",
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert "INT8 speed vs FP32" in proc.stderr and "NOT faster" in proc.stderr
    assert (
        "INT8 is not worth serving: batch 1: " in proc.stderr
        and "< --min-int8-speedup 1000" in (proc.stderr)
    )
    assert not versions(repo / "antsbees")
    stage = next(
        s
        for s in json.loads((out / "parity.json").read_text())["stages"]
        if s["name"] == "onnxruntime-int8"
    )
    assert stage["status"] == "failed" and stage["fallback"] is None  # accuracy passed
    assert stage["thresholds"]["min_int8_speedup"] == 1000
    speed = json.loads((out / "parity.json").read_text())["precision_details"]["int8"]["speed"]
    for batch in ("1", "8"):
        fp32, int8 = speed["batches"][batch]["fp32"], speed["batches"][batch]["int8"]
        assert fp32["images_per_s"] > 0 and int8["images_per_s"] > 0
        assert int8["speedup"] == pytest.approx(int8["images_per_s"] / fp32["images_per_s"], 0.01)
    assert speed["passed"] is False and speed["slowest_speedup"] < 1000


@pytest.mark.long
def test_int8_fallback_publishes_and_triton_serves_it(trained_run: Path, tmp_path: Path) -> None:
    """`make export PRECISION=int8` (its python -m export equivalent): the plain INT8 model
    of this low-margin model fails the gate, the fallback keeps the most sensitive nodes in
    FP32 until it passes, and the published version - an INT8 graph - is served by the real
    tritonserver (the export's Triton stages) with exactly ONNX Runtime's INT8 outputs. The
    gate: at most two of 153 images disagree (98.5%) and none that FP32 gets right is
    broken. Measured on the session's one-epoch probe model (AMD EPYC, VNNI): plain INT8
    disagrees on 3 (1 broken, 2 fixed); two images that INT8 gets right and FP32 wrong stay
    flipped even with 75% of the nodes in FP32, so 99% is out of the fallback's reach."""
    out, repo = tmp_path / "out", tmp_path / "repo"
    # the speed gate is this machine's (test_int8_speed_gate_refuses_a_slow_int8 covers it)
    proc = _int8_export(
        trained_run,
        out,
        repo,
        "--small-set-min-agreement",
        "0.985",
        "--small-set-drop-images",
        "0",
        "--min-int8-speedup",
        "0",
    )
    assert "INT8 speed vs FP32" in proc.stderr and "publishing INT8" in proc.stderr
    assert "published antsbees version 1 (cpu)" in proc.stderr
    report = json.loads((out / "parity.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    stage = by_name["onnxruntime-int8"]
    assert stage["gating"] is True and stage["status"] == "passed"
    assert (
        stage["top1_agreement"] >= 0.985 and stage["reference_accuracy"] == report["reference_top1"]
    )
    assert stage["thresholds"]["allowed_drop"] < 1 / 153  # no correct answer may be lost
    assert stage["accuracy_drop"] <= stage["thresholds"]["allowed_drop"] + 1e-12
    fallback = stage["fallback"]
    assert fallback["plain"]["status"] == "failed"
    assert fallback["status"] == "passed" and 0 < len(fallback["excluded"]) <= fallback["max_nodes"]
    assert fallback["tried"][-1]["status"] == "passed" or any(
        t["status"] == "passed" and t["excluded"] == len(fallback["excluded"])
        for t in fallback["tried"]
    )
    assert set(fallback["images_per_s"]) >= {"fp32", "plain", "fallback"}
    # The failed plain stage was localized, and its layer-by-layer ranking was searched
    # beside block sensitivity: the one passing with fewer nodes in FP32 was kept.
    assert stage["localized"]["images"] == 8
    passing = {k: r["smallest_passing"] for k, r in fallback["rankings"].items()}
    assert "block_sensitivity" in passing and fallback["ranking"] in passing
    best = min(
        (k for k in passing if passing[k]), key=lambda k: (passing[k], k != "block_sensitivity")
    )
    assert fallback["ranking"] == best, fallback["rankings"]
    # The INT8 TensorRT flavour (symmetric, float biases) built by TensorRT-RTX: explicit
    # Q/DQ, INT8 tensors; ONNX Runtime judges it too (advisory: the CPU serves its own).
    builds = {b["precision"]: b for b in report["tensorrt_builds"]}
    assert builds["int8"]["onnx"] == "model_int8_trt.onnx" and builds["int8"]["status"] == "built"
    assert builds["int8"]["layer_types"].get("INT8", 0) > 0
    trt_int8 = by_name["onnxruntime-int8-tensorrt"]
    assert trt_int8["gating"] is False and trt_int8["top1_agreement"] is not None
    version = repo / "antsbees" / "1"
    assert sha256(version / "model.onnx") == sha256(out / "model_int8.onnx")
    graph = onnx.load(str(version / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    conv_weights = [t for t in graph.graph.initializer if len(t.dims) == 4]
    assert any(t.data_type == onnx.TensorProto.INT8 for t in conv_weights)
    # Excluded nodes really stay FP32 (weights not dequantized from INT8); the rest do not.
    producer = {o: n.op_type for n in graph.graph.node for o in n.output}
    weight_int8 = {
        n.name: producer.get(n.input[1]) == "DequantizeLinear"
        for n in graph.graph.node
        if n.op_type == "Conv"
    }
    assert not any(weight_int8[name] for name in fallback["excluded"] if name in weight_int8)
    assert sum(weight_int8.values()) > 0
    card = ModelCard.from_dict(json.loads((version / "model_card.json").read_text()))
    assert card.precision == "int8"
    details = card.precision_details
    assert (
        details["gate"]["small_set_min_agreement"] == 0.985
        and details["gate"]["max_accuracy_drop"] == 0.005
    )
    int8 = details["int8"]
    assert int8["calibration_images"] == 32 and int8["calibration_method"] == "MinMax"
    assert int8["calibration_split"] == "train" and int8["per_channel"] is True
    assert int8["nodes_excluded"] == fallback["excluded"]
    assert details["stages"]["onnxruntime-int8"]["fallback"]["excluded"] == fallback["excluded"]
    for protocol in ("http", "grpc", "image"):
        served = by_name[f"triton-{protocol}"]
        assert served["reference"] == "onnxruntime-int8" and served["status"] == "passed"
        assert served["max_abs"] == 0.0 and served["images"] == 153
        assert served["accuracy"] == stage["accuracy"]  # accuracy measured end to end


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT INT8 engine test needs TensorRT + GPU: {TRT_WHY}")
def test_tensorrt_int8_engine_is_strongly_typed_and_gated(
    trained_run: Path, tmp_path: Path
) -> None:
    """TARGET=gpu PRECISION=int8: the engine is built from the explicit Q/DQ graph (no
    implicit calibration) and judged by the accuracy gate (gating)."""
    out = tmp_path / "out"
    report = run_export(
        ExportConfig(
            checkpoint=str(trained_run / "checkpoint.pt"),
            out_dir=str(out),
            repository=str(tmp_path / "repo"),
            serving=ServingConfig(
                max_batch_size=64, target="gpu", gpu_backend="tensorrt", preferred_batch_sizes=[64]
            ),
            precision=PrecisionConfig(precision="int8", calibration=Calibration(count=32)),
        )
    )
    stage = next(s for s in report["stages"] if s["name"] == "tensorrt-int8")
    assert stage["gating"] is True and stage["gate"] == "accuracy" and stage["status"] == "passed"
    meta = json.loads((out / "model.plan.json").read_text())
    assert meta["precision"] == "int8" and meta["strongly_typed"] is True
    assert meta["onnx"].endswith("model_int8_trt.onnx")


def test_calibration_halves_are_disjoint_training_images() -> None:
    from export.checks.stages import PixelBatches
    from export.tools.calibration_search import split_training

    x = np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2)
    pixels = PixelBatches([x[:4], x[4:8], x[8:]], np.arange(10) % 2, [f"img{i}" for i in range(10)])
    calib, select = split_training(pixels, seed=0, batch_size=3)
    assert calib.count == 5 and select.count == 5
    assert not set(calib.paths) & set(select.paths)
    assert set(calib.paths) | set(select.paths) == set(pixels.paths)
    for part in (calib, select):  # each image keeps its own pixels and label
        for i, path in enumerate(part.paths):
            k = int(path[3:])
            assert np.array_equal(np.concatenate(part.batches)[i], x[k])
            assert part.labels[i] == k % 2


@pytest.mark.long
def test_calibrate_chooses_on_training_images_and_reports_val(
    trained_run: Path, model_repo: Path, hymenoptera: Path, tmp_path: Path
) -> None:
    """`python -m export calibrate`: every choice quantized, chosen by agreement on the
    held-out training half, each one's val gate verdict reported; JSON + PNG written."""
    proc = run_cli(
        "export",
        "calibrate",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--data",
        str(hymenoptera),
        "--methods",
        "MinMax",
        "--counts",
        "8",
        "0",
        "--out",
        str(tmp_path),
    )
    report = json.loads((tmp_path / "int8-calibration-latest.json").read_text())
    rows = report["candidates"]
    assert {(r["per_channel"], r["calibration_images"]) for r in rows} == {
        (True, 8),
        (False, 8),
        (True, report["training_images"]["calibration"]),
        (False, report["training_images"]["calibration"]),
    }
    train_images = sum(1 for p in (hymenoptera / "train").rglob("*") if p.is_file())
    assert sum(report["training_images"].values()) == train_images
    best = max(r["selection"]["top1_agreement"] for r in rows)
    assert report["chosen"]["selection"]["top1_agreement"] == best
    assert all(r["val"]["images"] == report["val_images"] > 0 for r in rows)
    assert all(r["val"]["gate"] in ("passed", "failed") for r in rows)
    assert (tmp_path / "int8-calibration-latest.png").stat().st_size > 0
    assert f'EXPORT_ARGS="{report["export_args"]}"' in proc.stdout
