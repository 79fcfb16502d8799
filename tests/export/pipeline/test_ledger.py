"""The parity ledger on its own (no model, no server): what a stage's verdict, a sample,
a revision and the pass/fail of the whole record do."""

from __future__ import annotations

import numpy as np

from export.checks.parity import FP32_GATE, AccuracyGate
from export.checks.stages import PixelBatches
from export.pipeline.ledger import Ledger


def _ledger(gating: set[str]) -> Ledger:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 20)
    reference = np.eye(2)[labels] * 4.0 + rng.normal(0, 0.1, (40, 2))  # right on every image
    pixels = PixelBatches(
        [rng.integers(0, 256, (8, 3, 4, 4)).astype(np.float32) for _ in range(5)],
        labels,
        [f"img{i}.jpg" for i in range(40)],
    )
    return Ledger(pixels, reference, ["a", "b"], AccuracyGate(), gating)


def test_a_stage_within_its_gate_passes_and_its_logits_are_kept():
    ledger = _ledger(set())
    out = ledger.reference + 1e-5
    stage = ledger.compare("onnxruntime-fp32", "pytorch-fp32", ledger.reference, out, FP32_GATE)
    assert stage.status == "passed" and stage.images == 40
    assert np.array_equal(ledger.logits["onnxruntime-fp32"], out)
    assert ledger.diffs["onnxruntime-fp32"].max() < 2e-5 and ledger.passed()


def test_a_failed_gating_stage_fails_the_record_and_an_advisory_one_does_not():
    flipped = _ledger({"onnxruntime-int8"}).reference[:, ::-1].copy()  # every answer wrong
    for gating, passed in (({"onnxruntime-int8"}, False), (set(), True)):
        ledger = _ledger(gating)
        stage = ledger.compare_reduced("onnxruntime-int8", flipped)
        assert stage.status == "failed" and stage.gating is (not passed)
        assert ledger.passed() is passed
        assert "top-1 agreement 0.0000%" in stage.reason


def test_a_sampled_stage_keeps_its_images_and_labels():
    ledger = _ledger(set())
    idx = ledger.sample(10)
    assert len(idx) == 10 and set(ledger.pixels.labels[idx]) == {0, 1}  # both classes
    sub = ledger.pixels_of(idx)
    assert sub.count == 10 and np.array_equal(sub.labels, ledger.pixels.labels[idx])
    assert np.array_equal(np.concatenate(sub.batches), np.concatenate(ledger.pixels.batches)[idx])
    ledger.compare_reduced("onnxruntime-fp16", ledger.reference[idx], idx)
    assert np.array_equal(ledger.indices["onnxruntime-fp16"], idx)
    assert ledger.stage("onnxruntime-fp16").images == 10


def test_a_revision_replaces_the_verdict_in_place():
    import dataclasses

    ledger = _ledger({"onnxruntime-int8"})
    ledger.skip("tensorrt-fp16", "pytorch-fp32", "no GPU")
    first = ledger.compare_reduced("onnxruntime-int8", ledger.reference[:, ::-1].copy())
    ledger.revise(dataclasses.replace(first, status="passed", reason=""), ledger.reference)
    assert [s.name for s in ledger.stages] == ["tensorrt-fp16", "onnxruntime-int8"]
    assert ledger.stage("onnxruntime-int8").status == "passed" and ledger.passed()
    assert ledger.stage("tensorrt-fp16").status == "skipped"
    assert np.array_equal(ledger.logits["onnxruntime-int8"], ledger.reference)
