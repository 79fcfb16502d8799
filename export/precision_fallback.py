"""Automatic precision fallback: when a gating reduced-precision stage fails the accuracy
gate, keep the nodes that hurt most in FP32 until it passes (or the budget runs out).

1. Sensitivity, in one pass on a few *training* images (never the val images the gate
   judges), with the intermediate tensors marked as graph outputs: for INT8 (QDQ), the
   quantization noise at each compute node's (Conv, Gemm, MatMul) inputs - activation
   and weights; for FP16, the error a node adds to its input's, against FP32
   (:func:`node_sensitivity`).
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


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named tensors (types from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return out


def _run_all(model: onnx.ModelProto, names: list[str], pixels: PixelBatches) -> dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(
        _with_outputs(model, names).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in pixels.batches:
        values = session.run(names, {input_name: batch})
        for n, v in zip(names, values, strict=True):
            outs[n].append(np.asarray(v, np.float32))
    return {n: np.concatenate(v) for n, v in outs.items()}


def node_sensitivity(
    fp32: onnx.ModelProto, reduced: onnx.ModelProto, nodes: list[str], pixels: PixelBatches
) -> dict[str, float]:
    """How much error each named node brings in, largest = most sensitive.

    In a QDQ (INT8) graph, a node's inputs come from DequantizeLinear: its noise is the
    relative squared quantization error of its activation input (the QuantizeLinear input
    vs the DequantizeLinear output, in the INT8 graph itself) plus that of its weights
    (the FP32 initializer vs its dequantized value). Elsewhere (FP16): the relative error
    of the node's output against FP32 minus that of its input.
    """
    producers = {t: n for n in reduced.graph.node for t in n.output}
    if any(n.op_type == "DequantizeLinear" for n in reduced.graph.node):
        return _qdq_noise(fp32, reduced, nodes, producers, pixels)
    by_name = {n.name: n for n in fp32.graph.node}
    present = set(producers) | {i.name for i in reduced.graph.input}
    pairs = {}
    for name in nodes:
        node = by_name[name]
        x, y = node.input[0], node.output[0]
        if x in present and y in present:
            pairs[name] = (x, y)
    tensors = sorted({t for pair in pairs.values() for t in pair})
    ref, red = _run_all(fp32, tensors, pixels), _run_all(reduced, tensors, pixels)
    return {n: _rel(ref[y], red[y]) - _rel(ref[x], red[x]) for n, (x, y) in pairs.items()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(a**2), 1e-30))


def _qdq_noise(
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    nodes: list[str],
    producers: dict[str, onnx.NodeProto],
    pixels: PixelBatches,
) -> dict[str, float]:
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    by_name = {n.name: n for n in qdq.graph.node}
    act_pairs: dict[str, tuple[str, str]] = {}  # node -> (float input, dequantized input)
    wt_pairs: dict[str, tuple[str, str]] = {}  # node -> (FP32 initializer, dequantized)
    for name in nodes:
        node = by_name.get(name)
        if node is None:
            continue
        for idx, inp in enumerate(node.input[:2]):
            dq = producers.get(inp)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and idx == 0:
                act_pairs[name] = (q.input[0], inp)
            elif idx == 1:
                original = inp.removesuffix("_DequantizeLinear_Output")
                if original in weights:
                    wt_pairs[name] = (original, inp)
    tensors = sorted(
        {t for pair in act_pairs.values() for t in pair} | {p[1] for p in wt_pairs.values()}
    )
    out = _run_all(qdq, tensors, pixels)
    scores = {}
    for name in set(act_pairs) | set(wt_pairs):
        score = 0.0
        if name in act_pairs:
            x, x_dq = act_pairs[name]
            score += _rel(out[x], out[x_dq])
        if name in wt_pairs:
            w, w_dq = wt_pairs[name]
            score += _rel(weights[w], out[w_dq][: len(weights[w])])
        scores[name] = score
    return scores


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
    scores = node_sensitivity(fp32, onnx.load(str(model_path)), nodes, probe)
    ranked = sorted(scores, key=scores.get, reverse=True)  # type: ignore[arg-type]
    log.info("fallback for %s: %d nodes ranked, worst %s", stage.name, len(ranked), ranked[:5])
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
        "method": "per-node quantization noise on 32 training images, worst excluded first",
        "ranked": [[n, round(scores[n], 6)] for n in ranked[:max_k]],
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
