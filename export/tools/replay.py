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
from export.checks.stages import PixelBatches, StageName
from export.runners.runner import Runner
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


def runner_for(bundle: Bundle, record: StageRecord, source: ReplaySource) -> Runner:
    """The runner of stage ``record`` from ``source`` (each needs only its own library:
    torch only for a PyTorch stage)."""
    stage = StageName(record.name)
    if source.engine:
        from export.runners.tensorrt import TensorRTRunner

        return TensorRTRunner(source.engine, stage)
    if source.url:
        from export.runners.triton import TritonRunner

        return TritonRunner(source.url, bundle.meta["model"], stage)
    if stage.is_triton:
        raise UsageError(
            f"stage {record.name} ran on Triton: give --url HOST:PORT of a server serving "
            f"{bundle.meta['model']} (`make serve`: localhost:8000 HTTP, localhost:8001 gRPC)"
        )
    if source.checkpoint or stage.runtime == "pytorch":
        if not source.checkpoint:
            raise UsageError(
                f"stage {record.name} ran the checkpoint in PyTorch: give --checkpoint FILE "
                "(or replay another runtime's stage, which needs neither torch nor the checkpoint)"
            )
        from export.runners.pytorch import PyTorchRunner
        from train.models.checkpoint import load_checkpoint

        fp16 = stage.precision == "fp16"
        pytorch = StageName.PYTORCH_FP16 if fp16 else StageName.PYTORCH_FP32
        return PyTorchRunner(load_checkpoint(Path(source.checkpoint)), pytorch)
    from export.runners.onnxruntime import OnnxRuntimeRunner

    model = source.model or bundle.model_path(record.name)
    if model is None:
        raise UsageError(f"the bundle has no model file for stage {record.name}; give --model FILE")
    if not Path(model).is_file():
        raise UsageError(f"no model file {model}")
    return OnnxRuntimeRunner(model, stage)


def _inputs(bundle: Bundle, stage: StageName, indices: np.ndarray | None) -> PixelBatches:
    """The bundle's exact pixels (and, for the raw-image stage, encoded files) of the
    images the stage ran on."""
    pixels, _labels, _names = bundle.inputs()
    images = bundle.images() if stage == StageName.TRITON_IMAGE else None
    if indices is not None:
        pixels = pixels[indices]
        images = None if images is None else [images[i] for i in indices]
    return PixelBatches.of(pixels, images=images)


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
    out = runner_for(bundle, record, source).logits(_inputs(bundle, StageName(name), indices))
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
