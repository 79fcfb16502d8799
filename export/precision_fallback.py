"""Automatic precision fallback: when a gating reduced-precision stage fails the accuracy
gate, keep the nodes that hurt most in FP32 until it passes (or the budget runs out).

1. Sensitivity, on a few *training* images (never the val images the gate judges): the
   compute nodes (Conv, Gemm, MatMul) in graph order are cut into ``fallback_groups``
   blocks; each block alone is kept in FP32 and the logit error against FP32 it removes
   is its sensitivity (:func:`block_sensitivity`). Per-node local noise was tried first
   and ranked the late layers worst, while the early ones matter most: their error is
   amplified by everything after them.
2. Search: exclude the worst ``k`` nodes (``nodes_to_exclude`` for ONNX Runtime
   quantization, ``node_block_list`` for the FP16 converter), ``k`` = 1, 2, 4, ...; re-run
   the stage on every val image under the same gate; once one passes, halve the step back
   toward the smallest passing ``k`` while rounds remain. At most ``fallback_rounds``
   re-checks and ``fallback_max_fraction`` of the compute nodes.
3. The list chosen, the accuracy and agreement before and after, and the throughput cost
   (in-process ONNX Runtime, this CPU) go into the stage's ``fallback`` record, the report
   and the card; the passing model replaces the plain one as the stage's model file.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from export.fp16 import convert_fp16
from export.int8 import quantizable_nodes, quantize_int8
from export.parity import Stage, format_stage, judge
from export.precision import INT8_STAGE, gating_stages
from export.stage_outputs import PixelBatches, load_pixels, onnxruntime_logits

if TYPE_CHECKING:
    from export.release import ExportRun

log = logging.getLogger(__name__)

SUPPORTED = (INT8_STAGE, "onnxruntime-fp16")


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def block_sensitivity(
    nodes: list[str],
    groups: int,
    rebuild: Callable[[list[str]], None],
    model_path: Path,
    fp32_path: Path,
    probe: PixelBatches,
) -> list[tuple[list[str], float]]:
    """Blocks of consecutive compute nodes (graph order), each with the logit error it
    removes when only it is kept in FP32 (probe images, against FP32), best first.

    One block at a time rather than one node at a time: the error a node injects is
    amplified by the layers after it, so it is measured where it matters - the logits -
    at ``groups`` re-builds instead of one per node."""
    fp32 = onnxruntime_logits(fp32_path, probe)
    rebuild([])
    base = _mse(onnxruntime_logits(model_path, probe), fp32)
    size = max(1, -(-len(nodes) // groups))
    blocks = [nodes[i : i + size] for i in range(0, len(nodes), size)]
    scored = []
    for block in blocks:
        rebuild(block)
        scored.append((block, base - _mse(onnxruntime_logits(model_path, probe), fp32)))
    rebuild([])
    return sorted(scored, key=lambda bs: bs[1], reverse=True)


def throughput(path: Path, batch: np.ndarray, repeats: int = 3) -> float:
    """Images/s of in-process ONNX Runtime on one batch (best of ``repeats``; noisy on a
    shared CPU - a cost indication, not a benchmark)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: batch})
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {name: batch})
        best = min(best, time.perf_counter() - t)
    return len(batch) / best


def _builder(run: ExportRun, stage_name: str) -> tuple[Path, Path, Callable[[list[str]], None]]:
    """(FP32 graph the node names refer to, the stage's model file, rebuild(excluded))."""
    cfg = run.cfg
    if stage_name == INT8_STAGE:
        prepared = run.out_dir / "model_prepared.onnx"
        cache = run.out_dir / "int8_calibration.json"

        def rebuild(excluded: list[str]) -> None:
            from export.int8 import metadata_of

            quantize_int8(
                prepared,
                run.int8_path,
                cfg.precision.calibration,
                None,
                cache,
                excluded,
                metadata_of(run.onnx_path),
            )

        return prepared, run.int8_path, rebuild

    def rebuild_fp16(excluded: list[str]) -> None:
        convert_fp16(run.onnx_path, run.fp16_path, cfg.keep_fp16_edges, excluded)

    return run.onnx_path, run.fp16_path, rebuild_fp16


def search(run: ExportRun, stage: Stage) -> Stage:
    """Find the nodes to keep in FP32 for ``stage`` to pass; returns the final stage."""
    pc = run.cfg.precision
    assert run.pixels is not None and run.reference is not None
    fp32_path, model_path, rebuild = _builder(run, stage.name)
    fp32 = onnx.load(str(fp32_path))
    nodes = quantizable_nodes(fp32)
    plain_copy = model_path.with_name(model_path.stem + "_plain.onnx")
    shutil.copyfile(model_path, plain_copy)
    data = pc.calibration_data or run.ckpt.config.get("data", "") or run.data
    probe = load_pixels(run.ckpt, data, pc.calibration.split, 16, run.cfg.workers, 32)
    t0 = time.perf_counter()
    blocks = block_sensitivity(nodes, pc.fallback_groups, rebuild, model_path, fp32_path, probe)
    ranked = [n for block, _ in blocks for n in block]
    log.info(
        "fallback for %s: %d blocks of %d nodes, most sensitive first: %s",
        stage.name,
        len(blocks),
        len(nodes),
        [(b[0], round(gain, 5)) for b, gain in blocks],
    )
    max_k = max(1, int(len(ranked) * pc.fallback_max_fraction))
    gating = stage.name in gating_stages(pc.precision, run.cfg.serving.target)
    classes = run.ckpt.card.classes
    tried: list[dict[str, Any]] = []
    results: dict[int, tuple[Stage, np.ndarray]] = {}

    def check(k: int) -> Stage:
        rebuild(ranked[:k])
        logits = onnxruntime_logits(model_path, run.pixels)
        s = judge(
            stage.name,
            stage.reference,
            run.reference,
            logits,
            pc.gate,
            gating,
            run.pixels.labels,
            classes,
        )
        tried.append(
            {
                "excluded": k,
                "status": s.status,
                "agreement": s.top1_agreement,
                "accuracy": s.accuracy,
            }
        )
        results[k] = (s, logits)
        log.info("fallback k=%d: %s", k, format_stage(s))
        return s

    k, low, passing = 1, 0, None
    while len(tried) < pc.fallback_rounds:
        if passing is None:
            if check(k).status == "passed":
                passing = k
                continue
            low, k = k, min(2 * k, max_k)
            if low == max_k:
                break
        else:
            mid = (low + passing) // 2
            if mid <= low:
                break
            if check(mid).status == "passed":
                passing = mid
            else:
                low = mid
    record: dict[str, Any] = {
        "method": "logit error removed per block of nodes kept in FP32 "
        "(32 training images), most sensitive first",
        "blocks": [{"nodes": b, "error_removed": round(g, 6)} for b, g in blocks],
        "budget_rounds": pc.fallback_rounds,
        "max_nodes": max_k,
        "tried": tried,
        "plain": {
            "status": stage.status,
            "reason": stage.reason,
            "top1_agreement": stage.top1_agreement,
            "accuracy": stage.accuracy,
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if passing is None:
        shutil.copyfile(plain_copy, model_path)  # the plain model stays the stage's file
        record.update(status="failed", excluded=[])
        stage.fallback = record
        stage.reason += f"; fallback found no passing set within {len(tried)} rounds"
        return stage
    rebuild(ranked[:passing])
    final, logits = results[passing]
    batch = run.pixels.batches[0][:8]
    record.update(
        status="passed",
        excluded=ranked[:passing],
        images_per_s={
            "fp32": round(throughput(run.onnx_path, batch), 1),
            "plain": round(throughput(plain_copy, batch), 1),
            "fallback": round(throughput(model_path, batch), 1),
            "batch": len(batch),
            "note": "in-process ONNX Runtime, best of 3 on one batch; shared CPU, noisy",
        },
    )
    final.fallback = record
    run.logits[stage.name] = logits
    if stage.name == INT8_STAGE:
        run.int8_logits = logits
        run.int8_details["nodes_excluded"] = ranked[:passing]
    return final


def fallback_step(run: ExportRun) -> None:
    """Run :func:`search` for every gating reduced stage that failed (when enabled)."""
    pc = run.cfg.precision
    names = gating_stages(pc.precision, run.cfg.serving.target)
    for i, stage in enumerate(run.stages):
        if stage.name not in names or stage.status != "failed":
            continue
        if not pc.fallback:
            stage.fallback = {"status": "disabled (--no-precision-fallback)"}
            continue
        if stage.name not in SUPPORTED:
            stage.fallback = {"status": f"not available for {stage.name} here"}
            continue
        run.stages[i] = search(run, stage)
        diff = run.logits[stage.name].astype(np.float64) - run.reference.astype(np.float64)
        run.diffs[stage.name] = np.abs(diff)
