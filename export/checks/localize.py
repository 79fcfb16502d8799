"""Where a reduced-precision graph goes wrong: ``python -m export localize BUNDLE --stage
NAME`` (and by itself when a gating FP16/INT8 stage fails its gate).

Both graphs (the stage's reduced one and the FP32 one) run in ONNX Runtime with every
node output marked as a graph output (Polygraphy's ``ModifyOutputs(MARK_ALL)``); tensors
are matched by name and producing op (in a Q/DQ graph where an activation was folded
into the quantization range, the dequantized copy its consumers read), and each layer's
error is measured relative to that tensor's own
scale: ``rel_rms = RMS(reduced - fp32) / RMS(fp32)`` (also ``rel_max``: the largest
difference over the same RMS), accumulated over a few images at a time so memory stays
that of one small batch of activations. The report lists the layers in graph order, the
first whose ``rel_rms`` exceeds the tolerance, and plots the curve.

TensorRT engines are not covered here (no GPU on these hosts): on a GPU host, Polygraphy
(``polygraphy run model.onnx --trt --onnxrt --trt-outputs mark all --onnx-outputs mark
all``) does the same layer by layer.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.checks.stages import REFERENCE, StageName
from serve.backend.errors import UsageError

log = logging.getLogger(__name__)

# A layer is "over tolerance" when its relative RMS error exceeds this (per precision);
# docs/export-and-parity.md shows the curves of healthy graphs these sit above.
TOLERANCE = {"fp16": 0.05, "int8": 0.3}
DEQUANTIZED = "_DequantizeLinear_Output"  # onnxruntime.quantization's naming


@dataclass(frozen=True)
class LayerError:
    """One tensor of the FP32 graph compared with the same-named tensor of the other."""

    index: int  # position in the FP32 graph's node order
    tensor: str
    node: str
    op: str
    rel_rms: float
    rel_max: float
    scale: float  # RMS of the FP32 tensor


@dataclass
class Localization:
    """The error of every matched layer, the first over ``tolerance``, and what ran."""

    stage: str
    model: str
    reference_model: str
    images: int
    tolerance: float
    layers: list[LayerError] = field(default_factory=list)
    unmatched: int = 0  # FP32 tensors with no same-named, same-shaped tensor in the other

    @property
    def first_over(self) -> LayerError | None:
        return next((layer for layer in self.layers if layer.rel_rms > self.tolerance), None)

    @property
    def worst(self) -> LayerError | None:
        return max(self.layers, key=lambda layer: layer.rel_rms, default=None)

    def to_dict(self) -> dict[str, Any]:
        first, worst = self.first_over, self.worst
        return {
            "stage": self.stage,
            "model": self.model,
            "reference_model": self.reference_model,
            "images": self.images,
            "tolerance": self.tolerance,
            "statistic": "rel_rms = RMS(diff) / RMS(fp32 tensor)",
            "first_over_tolerance": asdict(first) if first else None,
            "worst": asdict(worst) if worst else None,
            "unmatched_tensors": self.unmatched,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def summary(self) -> str:
        first = self.first_over
        if first is None:
            return (
                f"{self.stage}: no layer over rel RMS {self.tolerance:g} on {self.images} "
                f"images (worst {self.worst.tensor if self.worst else '-'} "
                f"{self.worst.rel_rms if self.worst else 0:.3g})"
            )
        return (
            f"{self.stage}: first layer over rel RMS {self.tolerance:g}: #{first.index} "
            f"{first.node} ({first.op}) -> {first.tensor}: {first.rel_rms:.3g} "
            f"(on {self.images} images)"
        )


def tolerance_for(stage: str) -> float:
    """The default tolerance for a stage's precision."""
    return TOLERANCE["int8"] if StageName(stage).precision == "int8" else TOLERANCE["fp16"]


def _session(path: str | Path) -> tuple[Any, list[str]]:
    import onnxruntime as ort
    from polygraphy import constants
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath

    model = ModifyOutputs(OnnxFromPath(str(path)), outputs=constants.MARK_ALL)()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return session, [o.name for o in session.get_outputs()]


def _graph_order(path: str | Path) -> list[tuple[str, str, str]]:
    """(tensor, node name, op type) for each node output, in the graph's node order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(out, n.name or out, n.op_type) for n in graph.node for out in n.output if out]


def localize(
    model: str | Path,
    reference_model: str | Path,
    pixels: np.ndarray,
    tolerance: float,
    stage: str = "",
    chunk: int = 4,
) -> Localization:
    """Every layer's error of ``model`` against ``reference_model`` (FP32) on ``pixels``
    (float32 NCHW 0..255), ``chunk`` images at a time."""
    reduced, reduced_names = _session(model)
    fp32, fp32_names = _session(reference_model)
    order = _graph_order(reference_model)
    # Quantizers fold an activation into the quantization range: its name then sits on
    # the unclipped producer, and the value its consumers read is the dequantized copy.
    ops = {t: op for t, _, op in _graph_order(model)}
    present = set(reduced_names)
    seen_as = {}
    for t, _, op in order:
        if ops.get(t) in (op, "Cast") and t in present:  # Cast: the FP16 graph's FP32 edge
            seen_as[t] = t
        elif f"{t}{DEQUANTIZED}" in present:
            seen_as[t] = f"{t}{DEQUANTIZED}"
    common = [t for t, _, _ in order if t in set(fp32_names) and t in seen_as]
    if not common:
        raise UsageError(f"{model} and {reference_model} share no tensor names to compare")
    acc = {t: np.zeros(3) for t in common}  # sum diff^2, sum ref^2, max |diff|
    counts: dict[str, int] = {}
    skip: set[str] = set()
    in_r, in_f = reduced.get_inputs()[0].name, fp32.get_inputs()[0].name
    for i in range(0, len(pixels), chunk):
        batch = np.ascontiguousarray(pixels[i : i + chunk], np.float32)
        got = dict(zip(reduced_names, reduced.run(None, {in_r: batch}), strict=True))
        want = dict(zip(fp32_names, fp32.run(None, {in_f: batch}), strict=True))
        for t in common:
            a, b = got[seen_as[t]], want[t]
            if t in skip or a.shape != b.shape or not np.issubdtype(b.dtype, np.floating):
                skip.add(t)
                continue
            d = a.astype(np.float64) - b.astype(np.float64)
            acc[t] += (float((d * d).sum()), float((b.astype(np.float64) ** 2).sum()), 0.0)
            acc[t][2] = max(acc[t][2], float(np.abs(d).max()) if d.size else 0.0)
            counts[t] = counts.get(t, 0) + int(b.size)
        del got, want
    nodes = {t: (node, op) for t, node, op in order}
    result = Localization(stage, str(model), str(reference_model), len(pixels), tolerance)
    for index, t in enumerate(common):
        if t in skip or not counts.get(t):
            continue
        sq_diff, sq_ref, max_diff = acc[t]
        scale = float(np.sqrt(sq_ref / counts[t]))
        floor = max(scale, 1e-12)
        rel_rms = float(np.sqrt(sq_diff / counts[t])) / floor
        node, op = nodes[t]
        result.layers.append(LayerError(index, t, node, op, rel_rms, max_diff / floor, scale))
    result.unmatched = len(order) - len(result.layers)
    return result


def pick_images(saved: np.ndarray, reference: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` images where the stage's logits differ most from the reference's
    (the images a failing stage gets wrong first), as indices into ``saved``."""
    worst = np.abs(np.asarray(saved, np.float64) - np.asarray(reference, np.float64)).max(1)
    return np.sort(np.argsort(-worst, kind="stable")[:count])


def write_outputs(loc: Localization, out_dir: Path) -> dict[str, Path]:
    """``localize-<stage>.json``, ``.md`` (the table) and ``.png`` (the error curve)."""
    from serve.core.files import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"localize-{loc.stage or Path(loc.model).stem}"
    paths = {k: out_dir / f"{stem}.{k}" for k in ("json", "md", "png")}
    atomic_write_json(paths["json"], loc.to_dict())
    atomic_write_text(paths["md"], "\n".join(markdown(loc)) + "\n")
    plot(loc, paths["png"])
    return paths


def markdown(loc: Localization, rows: int = 12) -> list[str]:
    """The summary and a table: the first layers over tolerance and the worst ones."""
    lines = [
        f"### Layer by layer: {loc.stage}",
        "",
        f"{loc.summary()}. Relative RMS error of each tensor (ONNX Runtime, every node "
        f"output) against the FP32 graph, {len(loc.layers)} layers matched by name.",
        "",
        "| # | node | op | output | rel RMS | rel max | over |",
        "| ---: | --- | --- | --- | ---: | ---: | --- |",
    ]
    first = loc.first_over
    picked = loc.layers[:rows]
    if first is not None:
        start = max(0, first.index - 2)
        picked = [layer for layer in loc.layers if layer.index >= start][:rows]
    for layer in picked:
        over = "**first**" if layer is first else ("yes" if layer.rel_rms > loc.tolerance else "")
        lines.append(
            f"| {layer.index} | {layer.node} | {layer.op} | {layer.tensor} "
            f"| {layer.rel_rms:.3g} | {layer.rel_max:.3g} | {over} |"
        )
    return [*lines, ""]


def plot(loc: Localization, path: Path) -> None:
    """Relative error per layer in graph order, the tolerance, the first layer over it."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = [layer.index for layer in loc.layers]
    ax.plot(x, [max(layer.rel_rms, 1e-9) for layer in loc.layers], lw=1.5, label="rel RMS")
    ax.plot(
        x, [max(layer.rel_max, 1e-9) for layer in loc.layers], lw=0.8, alpha=0.6, label="rel max"
    )
    ax.axhline(loc.tolerance, color="gray", ls="--", lw=1, label=f"tolerance {loc.tolerance:g}")
    first = loc.first_over
    if first is not None:
        ax.axvline(first.index, color="red", lw=1)
        ax.annotate(
            f"first over: {first.node} ({first.op})",
            (first.index, first.rel_rms),
            xytext=(8, 8),
            textcoords="offset points",
            color="red",
            fontsize=8,
        )
    ax.set(
        yscale="log",
        xlabel="layer (FP32 graph order)",
        ylabel="error / RMS of the FP32 tensor",
        title=f"{loc.stage}: error layer by layer vs FP32 ({loc.images} images)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a parity bundle: runs/<model>/parity or <version>/report/parity")
    p.add_argument("--stage", required=True, help="a reduced-precision ONNX Runtime stage")
    p.add_argument("--model", default="", help="localize this ONNX file instead of the stage's own")
    p.add_argument("--images", type=int, default=8, help="images to run (the worst for the stage)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help=f"rel RMS error a layer may reach (default by precision: {TOLERANCE})",
    )
    p.add_argument("--out", default="", help="folder for the JSON/MD/PNG (default: beside BUNDLE)")


def run(a: argparse.Namespace) -> int:
    """The ``localize`` command."""
    from export.checks.bundle import Bundle

    bundle = Bundle.load(a.bundle)
    record = bundle.stage(a.stage)
    model = Path(a.model) if a.model else bundle.model_path(a.stage)
    fp32 = bundle.model_path(StageName.ONNXRUNTIME_FP32)
    if model is None or fp32 is None:
        raise UsageError(
            f"localize compares ONNX graphs: {a.stage} ({record.runtime}) has no ONNX file in "
            "the bundle; give --model FILE"
        )
    pixels, _labels, _names = bundle.inputs()
    saved, indices = bundle.outputs(a.stage)
    reference, _ = bundle.outputs(REFERENCE)
    reference = reference if indices is None else reference[indices]
    chosen = pick_images(saved, reference, a.images)
    chosen = chosen if indices is None else indices[chosen]
    tol = a.tolerance or tolerance_for(a.stage)
    loc = localize(model, fp32, pixels[chosen], tol, a.stage)
    paths = write_outputs(loc, Path(a.out) if a.out else bundle.path.parent / "localize")
    print("\n".join(markdown(loc)))
    print(f"wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}")
    return 0
