"""``python -m export replay BUNDLE --stage NAME``: run one parity stage again from its
bundle (export/checks/bundle.py) alone and judge it as the export did.

The stage's runtime runs on the bundle's exact pixels: ONNX Runtime on the bundle's
model file (or ``--model FILE``), a TensorRT plan (``--engine PLAN``), a running Triton
(``--url HOST:PORT``), or PyTorch (``--checkpoint FILE``; the only runtime that needs
torch). Its logits are judged twice under the stage's own gate: against the saved
reference (the export's verdict, again) and against the stage's saved outputs (did this
host, library or file compute what the export saw?). Exit 0 when both pass, 3 when one
fails.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.checks.bundle import Bundle, StageRecord
from export.checks.parity import Stage, format_stage, judge
from serve.backend.errors import UsageError
from serve.core.cli_common import EXIT_GATE, EXIT_OK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplaySource:
    """What runs the stage: at most one of a model file, a plan, a server, a checkpoint."""

    model: str = ""
    engine: str = ""
    url: str = ""
    checkpoint: str = ""

    def describe(self, bundle: Bundle, record: StageRecord) -> str:
        if self.engine:
            return f"TensorRT plan {self.engine}"
        if self.url:
            return f"Triton at {self.url}"
        if self.checkpoint:
            return f"PyTorch, checkpoint {self.checkpoint}"
        model = self.model or bundle.model_path(record.name)
        return f"ONNX Runtime, {model}"


def onnxruntime_run(model: str | Path, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    """ONNX Runtime (CPU) on float32 pixels, ``batch`` images at a time."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: pixels[i : i + batch]})[0] for i in range(0, len(pixels), batch)]
    )


def _run(
    bundle: Bundle, record: StageRecord, source: ReplaySource, indices: np.ndarray | None
) -> np.ndarray:
    pixels, _labels, _names = bundle.inputs()
    if indices is not None:
        pixels = pixels[indices]
    runtime = record.runtime
    if source.engine:
        from export.formats.tensorrt_engine import tensorrt_logits
        from serve.core.names import INPUT_NAME, OUTPUT_NAME

        return tensorrt_logits(source.engine, [pixels], INPUT_NAME, OUTPUT_NAME)
    if source.url:
        from serve.client.client import Classifier
        from serve.core.names import image_model_name

        model = bundle.meta["model"]
        if runtime == "triton-image":
            images = bundle.images()
            chosen = images if indices is None else [images[i] for i in indices]
            with Classifier(source.url, image_model_name(model)) as clf:
                return clf.logits(np.array([[b] for b in chosen], dtype=object))
        protocol = "http" if runtime == "triton-http" else "grpc"
        with Classifier(source.url, model, protocol=protocol) as clf:
            return clf.logits(pixels)
    if runtime.startswith("triton"):
        raise UsageError(
            f"stage {record.name} ran on Triton: give --url HOST:PORT of a server serving "
            f"{bundle.meta['model']} (`make serve`: localhost:8000 HTTP, localhost:8001 gRPC)"
        )
    if source.checkpoint or runtime == "pytorch":
        if not source.checkpoint:
            raise UsageError(
                f"stage {record.name} ran the checkpoint in PyTorch: give --checkpoint FILE "
                "(or replay another runtime's stage, which needs neither torch nor the checkpoint)"
            )
        return _pytorch(source.checkpoint, record, pixels)
    model = source.model or bundle.model_path(record.name)
    if model is None:
        raise UsageError(f"the bundle has no model file for stage {record.name}; give --model FILE")
    if not Path(model).is_file():
        raise UsageError(f"no model file {model}")
    return onnxruntime_run(model, pixels)


def _pytorch(checkpoint: str, record: StageRecord, pixels: np.ndarray) -> np.ndarray:
    from export.checks.stage_outputs import PixelBatches, pytorch_logits
    from export.formats.fp16 import pytorch_fp16_logits
    from train.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(checkpoint))
    batches = PixelBatches([pixels[i : i + 32] for i in range(0, len(pixels), 32)], np.zeros(0), [])
    if "fp16" in record.name:
        return pytorch_fp16_logits(ckpt, batches)[0]
    return pytorch_logits(ckpt, batches)


def replay(bundle: Bundle, name: str, source: ReplaySource) -> tuple[Stage, Stage]:
    """Run stage ``name`` again; returns its verdict against the saved reference and
    against its own saved outputs (both under the stage's gate)."""
    record = bundle.stage(name)
    if not record.reference:
        raise UsageError(f"{name} is the reference every stage is judged against; replay a stage")
    saved, indices = bundle.outputs(name)
    reference, ref_indices = bundle.outputs(record.reference)
    if ref_indices is not None and indices is None:
        raise UsageError(f"the reference {record.reference} covers a sample, {name} every image")
    if ref_indices is not None and indices is not None:
        where = {int(j): k for k, j in enumerate(ref_indices)}
        reference = reference[[where[int(i)] for i in indices]]
    elif indices is not None:
        reference = reference[indices]
    _pixels, labels, names = bundle.inputs()
    if indices is not None:
        labels, names = labels[indices], [names[i] for i in indices]
    log.info("replaying %s on %d images (%s)", name, len(saved), source.describe(bundle, record))
    out = _run(bundle, record, source, indices)
    gate = record.gate_object()
    classes = bundle.classes
    vs_reference = judge(
        name, record.reference, reference, out, gate, record.gating, labels, classes, names
    )
    vs_saved = judge(name, f"saved {name}", saved, out, gate, record.gating, labels, classes, names)
    return vs_reference, vs_saved


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a parity bundle: runs/<model>/parity or <version>/report/parity")
    p.add_argument("--stage", required=True, help="the stage to run again (bundle.json lists them)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="", help="run this ONNX file instead of the bundle's own")
    src.add_argument("--engine", default="", help="run this TensorRT plan (GPU hosts)")
    src.add_argument("--url", default="", help="run on a Triton serving the model (HOST:PORT)")
    src.add_argument(
        "--checkpoint", default="", help="the checkpoint, for the PyTorch stages (needs torch)"
    )


def run(a: argparse.Namespace) -> int:
    """The ``replay`` command: print both verdicts; 0 when both passed, 3 otherwise."""
    bundle = Bundle.load(a.bundle)
    source = ReplaySource(a.model, a.engine, a.url, a.checkpoint)
    vs_reference, vs_saved = replay(bundle, a.stage, source)
    print(format_stage(vs_reference))
    print(format_stage(vs_saved))
    passed = vs_reference.status == "passed" and vs_saved.status == "passed"
    recorded = bundle.stage(a.stage).status
    print(
        f"{a.stage}: {'PASSED' if passed else 'FAILED'} (the export recorded {recorded}; "
        f"gate: {bundle.stage(a.stage).gate})"
    )
    return EXIT_OK if passed else EXIT_GATE
