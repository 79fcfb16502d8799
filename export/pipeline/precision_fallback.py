"""Automatic precision fallback: when a gating reduced-precision stage fails the accuracy
gate, keep the nodes that hurt most in FP32 until it passes (or the budget runs out).

1. Sensitivity, on a few *training* images (never the val images the gate judges): the
   compute nodes (Conv, Gemm, MatMul) in graph order are cut into ``fallback_groups``
   blocks; each block alone is kept in FP32 and the logit error against FP32 it removes
   is its sensitivity (:func:`block_sensitivity`). Per-node local noise was tried first
   and ranked the late layers worst, while the early ones matter most: their error is
   amplified by everything after them.
   A second ranking, from the same training images, orders the nodes by the error each
   adds layer by layer (export/checks/localize.py: its output's relative error minus its
   inputs'); it is searched too, for sets smaller than the first ranking's,
   and the ranking that passes with fewer nodes in FP32 is kept (``ranking`` and
   ``rankings`` in the record).
2. Search: exclude the worst ``k`` nodes (``nodes_to_exclude`` for ONNX Runtime
   quantization, ``node_block_list`` for the FP16 converter), ``k`` = 1, 2, 4, ...; re-run
   the stage on every val image under the same gate; once one passes, halve the step back
   toward the smallest passing ``k`` while rounds remain. At most ``fallback_rounds``
   re-checks and ``fallback_max_fraction`` of the compute nodes.
3. Every passing set is kept; the *fastest* of them (in-process ONNX Runtime on this CPU,
   measured interleaved with FP32, :func:`measure_speed`) is chosen - keeping nodes in FP32
   costs speed, and INT8 is asked for to be faster. The list chosen, the accuracy and
   agreement before and after and the speeds go into the stage's ``fallback`` record, the
   report and the card; the chosen model replaces the plain one as the stage's model file.
4. The speed gate (:func:`speed_gate`, ``PRECISION=int8`` on CPU): the INT8 model that
   passed the accuracy gate is published only when it measures at least
   ``min_int8_speedup`` x FP32's images/s at batch 1 and at batch 8; else the stage fails
   with the numbers (exit 3, nothing published). The verdict is printed either way.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.checks.localize import Localization, localize
from export.checks.parity import Stage, format_stage, judge
from export.checks.stage_outputs import load_pixels
from export.checks.stages import PixelBatches, StageName
from export.formats.fp16 import convert_fp16
from export.formats.int8 import metadata_of, quantizable_nodes, quantize_int8
from export.pipeline.job import ExportJob
from export.pipeline.ledger import Ledger
from export.pipeline.precision import calibration_data
from export.runners.onnxruntime import OnnxRuntimeRunner

log = logging.getLogger(__name__)

SUPPORTED = (StageName.ONNXRUNTIME_INT8, StageName.ONNXRUNTIME_FP16)


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
    fp32 = OnnxRuntimeRunner(fp32_path).logits(probe)
    rebuild([])
    base = _mse(OnnxRuntimeRunner(model_path).logits(probe), fp32)
    size = max(1, -(-len(nodes) // groups))
    blocks = [nodes[i : i + size] for i in range(0, len(nodes), size)]
    scored = []
    for block in blocks:
        rebuild(block)
        scored.append((block, base - _mse(OnnxRuntimeRunner(model_path).logits(probe), fp32)))
    rebuild([])
    return sorted(scored, key=lambda bs: bs[1], reverse=True)


SPEED_BATCHES = (1, 8)


def measure_speed(
    models: dict[str, Path], images: np.ndarray, rounds: int = 7, window_s: float = 0.15
) -> dict[str, Any]:
    """Images/s of in-process ONNX Runtime for each model, at each of :data:`SPEED_BATCHES`:
    all sessions open at once, then ``rounds`` rounds in which every model runs for
    ``window_s`` in turn (the order rotating), so drift and a neighbour's load hit all of
    them alike; the median round is the figure. ``speedup`` is against ``fp32``."""
    import onnxruntime as ort

    sessions = {
        k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for k, p in models.items()
    }
    names = list(sessions)
    result: dict[str, Any] = {"rounds": rounds, "window_s": window_s, "batches": {}}
    for bs in SPEED_BATCHES:
        batch = np.ascontiguousarray(np.resize(images, (bs, *images.shape[1:])), np.float32)
        feeds = {k: {s.get_inputs()[0].name: batch} for k, s in sessions.items()}
        for k, sess in sessions.items():
            sess.run(None, feeds[k])  # warm-up
        samples: dict[str, list[float]] = {k: [] for k in names}
        for r in range(rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                n, t = 0, time.perf_counter()
                while True:
                    sessions[k].run(None, feeds[k])
                    n += 1
                    elapsed = time.perf_counter() - t
                    if elapsed >= window_s:
                        break
                samples[k].append(n * bs / elapsed)
        med = {k: float(np.median(v)) for k, v in samples.items()}
        result["batches"][str(bs)] = {
            k: {"images_per_s": round(med[k], 1), "speedup": round(med[k] / med["fp32"], 3)}
            for k in names
        }
    return result


def slowest_speedup(speed: dict[str, Any], name: str) -> float:
    """``name``'s speedup over FP32 at its worst batch size."""
    return min(b[name]["speedup"] for b in speed["batches"].values())


def describe_speed(speed: dict[str, Any], name: str) -> str:
    """e.g. ``batch 1: 432.1 vs 284.0 img/s (1.52x), batch 8: ...``."""
    return ", ".join(
        f"batch {bs}: {b[name]['images_per_s']} vs {b['fp32']['images_per_s']} img/s "
        f"({b[name]['speedup']:.2f}x)"
        for bs, b in speed["batches"].items()
    )


def _builder(job: ExportJob, stage_name: str) -> tuple[Path, Path, Callable[[list[str]], None]]:
    """(FP32 graph the node names refer to, the stage's model file, rebuild(excluded))."""
    cfg = job.cfg
    if stage_name == StageName.ONNXRUNTIME_INT8:
        prepared = job.out_dir / "model_prepared.onnx"
        cache = job.out_dir / "int8_calibration.json"
        meta = metadata_of(job.onnx_path)

        def rebuild(excluded: list[str]) -> None:
            quantize_int8(
                prepared, job.int8_path, cfg.precision.calibration, None, cache, excluded, meta
            )

        return prepared, job.int8_path, rebuild

    def rebuild_fp16(excluded: list[str]) -> None:
        convert_fp16(job.onnx_path, job.fp16_path, cfg.keep_fp16_edges, excluded)

    return job.onnx_path, job.fp16_path, rebuild_fp16


@dataclass
class _Search:
    """One fallback search's state: the ranked nodes and every set tried."""

    job: ExportJob
    ledger: Ledger
    stage: Stage
    ranked: list[str]
    model_path: Path
    rebuild: Callable[[list[str]], None]
    candidates_dir: Path
    tried: list[dict[str, Any]] = field(default_factory=list)
    results: dict[int, tuple[Stage, np.ndarray]] = field(default_factory=dict)

    def check(self, k: int) -> Stage:
        """Rebuild with the worst ``k`` nodes in FP32 and judge it on every image."""
        pc, ledger = self.job.cfg.precision, self.ledger
        self.rebuild(self.ranked[:k])
        logits = OnnxRuntimeRunner(self.model_path).logits(ledger.pixels)
        s = judge(
            self.stage.name,
            self.stage.reference,
            ledger.reference,
            logits,
            pc.gate,
            self.stage.name in self.job.gating,
            ledger.pixels.labels,
            ledger.classes,
        )
        self.tried.append(
            {
                "excluded": k,
                "status": s.status,
                "agreement": s.top1_agreement,
                "accuracy": s.accuracy,
            }
        )
        self.results[k] = (s, logits)
        if s.status == "passed":  # a candidate: the fastest passing set is chosen later
            shutil.copyfile(self.model_path, self.candidates_dir / f"k{k}.onnx")
        log.info("fallback k=%d: %s", k, format_stage(s))
        return s

    def smallest_passing(self, max_k: int) -> int | None:
        """k = 1, 2, 4, ... until one passes, then halve back toward the smallest passing
        k while rounds remain; None when none passed within the budget."""
        rounds = self.job.cfg.precision.fallback_rounds
        k, low, passing = 1, 0, None
        while len(self.tried) < rounds:
            if passing is None:
                if self.check(k).status == "passed":
                    passing = k
                    continue
                low, k = k, min(2 * k, max_k)
                if low == max_k:
                    break
            else:
                mid = (low + passing) // 2
                if mid <= low:
                    break
                if self.check(mid).status == "passed":
                    passing = mid
                else:
                    low = mid
        return passing


def _ranked_nodes(
    job: ExportJob, stage: Stage, rebuild: Callable[[list[str]], None], paths: tuple[Path, Path]
) -> tuple[list[str], list[tuple[list[str], float]], PixelBatches]:
    """The compute nodes, most sensitive block first, the blocks with their scores, and
    the training images that measured them."""
    fp32_path, model_path = paths
    pc = job.cfg.precision
    nodes = quantizable_nodes(onnx.load(str(fp32_path)))
    data = calibration_data(job)
    probe = load_pixels(job.ckpt, data, pc.calibration.split, 16, job.cfg.workers, 32)
    blocks = block_sensitivity(nodes, pc.fallback_groups, rebuild, model_path, fp32_path, probe)
    log.info(
        "fallback for %s: %d blocks of %d nodes, most sensitive first: %s",
        stage.name,
        len(blocks),
        len(nodes),
        [(b[0], round(gain, 5)) for b, gain in blocks],
    )
    return [n for block, _ in blocks for n in block], blocks, probe


def probe_localization(
    stage: Stage, model_path: Path, fp32_path: Path, probe: PixelBatches
) -> Localization:
    """The plain reduced graph layer by layer on the 8 *training* images (of the probe)
    where it differs most from FP32: the second ranking's evidence, never the val images
    the gate judges."""
    from export.checks.localize import pick_images, tolerance_for

    reduced = OnnxRuntimeRunner(model_path).logits(probe)
    fp32 = OnnxRuntimeRunner(fp32_path).logits(probe)
    pixels = np.concatenate(probe.batches)[pick_images(reduced, fp32, 8)]
    return localize(model_path, fp32_path, pixels, tolerance_for(stage.name), stage.name)


def _record(
    state: _Search, blocks: list[tuple[list[str], float]], max_k: int, seconds: float
) -> dict[str, Any]:
    """The stage's ``fallback`` record: how nodes were ranked, what was tried, the plain
    model's verdict."""
    stage = state.stage
    return {
        "method": "logit error removed per block of nodes kept in FP32 "
        "(32 training images), most sensitive first",
        "blocks": [{"nodes": b, "error_removed": round(g, 6)} for b, g in blocks],
        "budget_rounds": state.job.cfg.precision.fallback_rounds,
        "max_nodes": max_k,
        "tried": state.tried,
        "plain": {
            "status": stage.status,
            "reason": stage.reason,
            "top1_agreement": stage.top1_agreement,
            "accuracy": stage.accuracy,
        },
        "seconds": round(seconds, 1),
    }


def localize_ranking(loc: Localization | None, nodes: list[str], fp32_path: Path) -> list[str]:
    """The compute ``nodes`` ordered by the error each adds in the layer-by-layer
    localization (its output's relative error minus the largest of its inputs'), the
    largest first; nodes the localization did not see follow in graph order."""
    if loc is None:
        return []
    error = {layer.tensor: layer.rel_rms for layer in loc.layers}
    graph = {n.name: n for n in onnx.load(str(fp32_path), load_external_data=False).graph.node}
    added: dict[str, float] = {}
    for name in nodes:
        node = graph.get(name)
        if node is None or node.output[0] not in error:
            continue
        before = max((error[i] for i in node.input if i in error), default=0.0)
        added[name] = error[node.output[0]] - before
    ranked = sorted(added, key=lambda n: added[n], reverse=True)
    return ranked + [n for n in nodes if n not in added]


def _search_with(
    job: ExportJob,
    ledger: Ledger,
    stage: Stage,
    ranked: list[str],
    paths: tuple[Path, Callable[[list[str]], None]],
    method: str,
    max_k: int,
) -> tuple[_Search, int | None]:
    model_path, rebuild = paths
    candidates_dir = model_path.parent / f"fallback_candidates_{method}"
    shutil.rmtree(candidates_dir, ignore_errors=True)
    candidates_dir.mkdir()
    state = _Search(job, ledger, stage, ranked, model_path, rebuild, candidates_dir)
    return state, state.smallest_passing(max_k) if max_k >= 1 else None


def search(
    job: ExportJob, ledger: Ledger, stage: Stage
) -> tuple[Stage, np.ndarray | None, list[str]]:
    """Find the nodes to keep in FP32 for ``stage`` to pass. Returns the final verdict,
    the chosen model's logits and the nodes it keeps in FP32 (None and [] when no set
    passed: the plain model stays the stage's file).

    Two rankings are searched, both measured on training images: block sensitivity,
    then the error each node adds layer by layer (:func:`probe_localization`), only for
    sets smaller than the first's; the one that passes with fewer nodes in FP32 is kept
    (block sensitivity on a tie), and the record says which."""
    pc = job.cfg.precision
    fp32_path, model_path, rebuild = _builder(job, stage.name)
    plain_copy = model_path.with_name(model_path.stem + "_plain.onnx")
    shutil.copyfile(model_path, plain_copy)
    t0 = time.perf_counter()
    ranked, blocks, probe = _ranked_nodes(job, stage, rebuild, (fp32_path, model_path))
    max_k = max(1, int(len(ranked) * pc.fallback_max_fraction))
    state, passing = _search_with(
        job, ledger, stage, ranked, (model_path, rebuild), "block_sensitivity", max_k
    )
    rankings: dict[str, Any] = {
        "block_sensitivity": {"smallest_passing": passing, "tried": len(state.tried)}
    }
    loc = probe_localization(stage, model_path, fp32_path, probe)  # the plain graph
    by_layer = localize_ranking(loc, ranked, fp32_path)
    if by_layer and by_layer[: passing or max_k] != ranked[: passing or max_k]:
        other, other_passing = _search_with(
            job,
            ledger,
            stage,
            by_layer,
            (model_path, rebuild),
            "localize",
            (passing - 1) if passing else max_k,
        )
        rankings["localize"] = {"smallest_passing": other_passing, "tried": len(other.tried)}
        if other_passing is not None:
            shutil.rmtree(state.candidates_dir, ignore_errors=True)
            state, passing, ranked = other, other_passing, by_layer
        else:
            shutil.rmtree(other.candidates_dir, ignore_errors=True)
    chosen_ranking = "localize" if ranked is by_layer and by_layer else "block_sensitivity"
    log.info("fallback rankings for %s: %s; kept %s", stage.name, rankings, chosen_ranking)
    candidates_dir = state.candidates_dir
    record = _record(state, blocks, max_k, time.perf_counter() - t0)
    record.update(rankings=rankings, ranking=chosen_ranking)
    if chosen_ranking == "localize":
        record["method"] = (
            "error each node adds layer by layer (localize, the 8 of the 32 training "
            "images where the plain graph differs most from FP32), largest first; it kept "
            "fewer nodes in FP32 than block sensitivity"
        )
    if passing is None:
        shutil.rmtree(candidates_dir, ignore_errors=True)
        shutil.copyfile(plain_copy, model_path)  # the plain model stays the stage's file
        record.update(status="failed", excluded=[])
        reason = stage.reason + f"; fallback found no passing set within {len(state.tried)} rounds"
        return dataclasses.replace(stage, fallback=record, reason=reason), None, []
    passed_k = sorted(k for k, (s, _) in state.results.items() if s.status == "passed")
    models = {"fp32": job.onnx_path, "plain": plain_copy}
    models |= {f"k{k}": candidates_dir / f"k{k}.onnx" for k in passed_k}
    speed = measure_speed(models, ledger.pixels.batches[0])
    chosen = max(passed_k, key=lambda k: (slowest_speedup(speed, f"k{k}"), -k))
    shutil.copyfile(candidates_dir / f"k{chosen}.onnx", model_path)
    shutil.rmtree(candidates_dir, ignore_errors=True)
    final, logits = state.results[chosen]
    log.info(
        "fallback: %d passing set(s) %s; the fastest keeps %d nodes in FP32: %s",
        len(passed_k),
        passed_k,
        chosen,
        describe_speed(speed, f"k{chosen}"),
    )
    batch1 = speed["batches"]["1"]
    record.update(
        status="passed",
        excluded=ranked[:chosen],
        passing=passed_k,
        speed=speed,
        images_per_s={
            "fp32": batch1["fp32"]["images_per_s"],
            "plain": batch1["plain"]["images_per_s"],
            "fallback": batch1[f"k{chosen}"]["images_per_s"],
            "batch": 1,
            "note": "in-process ONNX Runtime, median of interleaved rounds (speed)",
        },
    )
    return dataclasses.replace(final, fallback=record), logits, ranked[:chosen]


def localize_failure(job: ExportJob, ledger: Ledger, stage: Stage) -> Stage:
    """A failed gating stage's graph, layer by layer against the FP32 graph its node
    names refer to, on the val images it gets most wrong (export/checks/localize.py):
    ``localize-<stage>.json/.md/.png`` in the run folder, the first layer over tolerance
    in the stage's record (a report for people; the fallback ranks on training images)."""
    from export.checks.localize import markdown, pick_images, tolerance_for, write_outputs

    model = job.stage_models().get(stage.name)
    if model is None or model.suffix != ".onnx" or not model.is_file():
        return stage
    logits = ledger.logits[stage.name]
    indices = ledger.indices.get(stage.name)
    reference = ledger.reference if indices is None else ledger.reference[indices]
    chosen = pick_images(logits, reference, 8)
    chosen = chosen if indices is None else indices[chosen]
    pixels = np.concatenate(ledger.pixels.batches)[chosen]
    fp32 = _builder(job, stage.name)[0] if stage.name in SUPPORTED else job.onnx_path
    loc = localize(model, fp32, pixels, tolerance_for(stage.name), stage.name)
    paths = write_outputs(loc, job.out_dir)
    log.info("%s (%s)", loc.summary(), paths["png"])
    first = loc.to_dict()["first_over_tolerance"]
    record = {
        "first_over_tolerance": first,
        "tolerance": loc.tolerance,
        "images": loc.images,
        "report": paths["md"].name,
        "table": markdown(loc),
    }
    return dataclasses.replace(stage, localized=record)


def fallback_step(job: ExportJob, ledger: Ledger) -> dict[str, list[str]]:
    """Run :func:`search` for every gating reduced stage that failed (when enabled) and
    revise its verdict; returns, per stage the fallback made pass, the nodes kept in FP32
    (its model file now has them)."""
    pc = job.cfg.precision
    excluded: dict[str, list[str]] = {}
    for stage in list(ledger.stages):
        if stage.name not in job.gating or stage.status != "failed":
            continue
        stage = localize_failure(job, ledger, stage)
        ledger.revise(stage)
        if not pc.fallback:
            status = "disabled (--no-precision-fallback)"
        elif stage.name not in SUPPORTED:
            status = f"not available for {stage.name} here"
        else:
            final, logits, nodes = search(job, ledger, stage)
            ledger.revise(dataclasses.replace(final, localized=stage.localized), logits)
            if logits is not None:
                excluded[stage.name] = nodes
            continue
        ledger.revise(dataclasses.replace(stage, fallback={"status": status}))
    return excluded


def speed_gate(job: ExportJob, ledger: Ledger) -> dict[str, Any] | None:
    """``PRECISION=int8`` on CPU: the INT8 model that passed the accuracy gate must measure
    at least ``min_int8_speedup`` x FP32's images/s (batch 1 and 8, in-process ONNX
    Runtime, interleaved rounds); else its stage fails with the numbers and nothing is
    published (exit 3). The verdict is printed and recorded in the stage either way;
    returns the measurement (None when there was nothing to measure)."""
    pc = job.cfg.precision
    if pc.precision != "int8" or job.cfg.serving.target != "cpu":
        return None
    stage = ledger.stage(StageName.ONNXRUNTIME_INT8)
    if stage is None or stage.status != "passed":
        return None
    models = {"fp32": job.onnx_path, "int8": job.int8_path}
    speed = measure_speed(models, ledger.pixels.batches[0])
    worst = slowest_speedup(speed, "int8")
    ok = worst >= pc.min_int8_speedup
    speed.update(min_speedup=pc.min_int8_speedup, slowest_speedup=worst, passed=ok)
    numbers = describe_speed(speed, "int8")
    log.info(
        "INT8 speed vs FP32 (in-process ONNX Runtime, this CPU): %s - %s than FP32 by the "
        "%.2fx --min-int8-speedup: %s",
        numbers,
        "faster" if ok else "NOT faster",
        pc.min_int8_speedup,
        "publishing INT8" if ok else "refusing (PRECISION=fp32 serves FP32)",
    )
    revised = dataclasses.replace(
        stage, thresholds={**stage.thresholds, "min_int8_speedup": pc.min_int8_speedup}
    )
    if not ok:
        revised.status = "failed"
        revised.reason = (
            f"INT8 is not worth serving: {numbers}, slowest {worst:.2f}x < "
            f"--min-int8-speedup {pc.min_int8_speedup:g}"
        )
    ledger.revise(revised)
    return speed
