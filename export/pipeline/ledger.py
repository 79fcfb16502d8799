"""The parity ledger: the images every stage is judged on, the PyTorch FP32 reference on
them, and each stage's verdict, element-wise differences and logits, in the order judged.

Steps add to it through :meth:`Ledger.compare`, :meth:`Ledger.compare_reduced` and
:meth:`Ledger.skip`; only the precision fallback and the speed gate revise a verdict
(:meth:`Ledger.revise`), so what changed a stage is visible where it happens."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from export.checks.parity import AccuracyGate, Gate, Stage, format_stage, judge, skipped
from export.checks.stages import REFERENCE, PixelBatches, StageName
from export.formats.tensorrt_rtx import RtxBuild
from serve.core.sampling import stratified

log = logging.getLogger(__name__)


@dataclass
class Ledger:
    """What parity found so far. ``reduced_gate`` judges the reduced-precision stages,
    ``gating`` names those that gate publishing (the rest are advisory)."""

    pixels: PixelBatches
    reference: np.ndarray  # pytorch-fp32 logits on every image
    classes: list[str]
    reduced_gate: AccuracyGate
    gating: set[StageName]
    stages: list[Stage] = field(default_factory=list)
    diffs: dict[str, np.ndarray] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # what each stage's run took
    indices: dict[str, np.ndarray] = field(default_factory=dict)  # a sampled stage's images
    encoded: list[bytes] | None = None  # what the raw-image stage sent

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``'s computation (``parity.json`` timings)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def compare(
        self,
        name: str,
        reference: str,
        ref: np.ndarray,
        out: np.ndarray,
        gate: Gate,
        gating: bool = True,
        indices: np.ndarray | None = None,
    ) -> Stage:
        """Judge stage ``name``'s logits ``out`` against ``ref`` (stage ``reference``);
        ``indices``: the images ``out`` is of (a sample), else all of them."""
        labels = self.pixels.labels if indices is None else self.pixels.labels[indices]
        paths = self.pixels.paths
        names = paths if indices is None else [paths[i] for i in indices]
        stage = judge(name, reference, ref, out, gate, gating, labels, self.classes, names)
        self.stages.append(stage)
        self._record(name, out, ref)
        if indices is not None:
            self.indices[name] = np.asarray(indices, np.int64)
        log.info("%s", format_stage(stage))
        return stage

    def compare_reduced(
        self, name: str, out: np.ndarray, indices: np.ndarray | None = None
    ) -> Stage:
        """A reduced-precision stage vs ``pytorch-fp32``, judged by the accuracy gate;
        gating when its model is what gets published."""
        ref = self.reference if indices is None else self.reference[indices]
        gating = name in self.gating
        return self.compare(name, REFERENCE, ref, out, self.reduced_gate, gating, indices)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """A stratified sample of ``n`` images (every class in proportion, fixed by
        ``seed``: serve/core/sampling.py) as indices."""
        return np.asarray(stratified(self.pixels.labels, n, seed), dtype=np.int64)

    def pixels_of(self, indices: np.ndarray | None) -> PixelBatches:
        """The images at ``indices`` as pixel batches (all of them for None)."""
        return self.pixels if indices is None else self.pixels.take(indices)

    def skip(self, name: str, reference: str, reason: str) -> None:
        """Record stage ``name`` as skipped, with why."""
        self.stages.append(skipped(name, reference, reason))
        log.info("%s", format_stage(self.stages[-1]))

    def revise(self, stage: Stage, logits: np.ndarray | None = None) -> None:
        """Replace the verdict of ``stage.name`` (and its logits, when the model changed)."""
        i = next(i for i, s in enumerate(self.stages) if s.name == stage.name)
        self.stages[i] = stage
        if logits is not None:
            self._record(stage.name, logits, self.reference[: len(logits)])

    def stage(self, name: str) -> Stage | None:
        """The verdict of stage ``name``, if it was judged or skipped."""
        return next((s for s in self.stages if s.name == name), None)

    def passed(self, failed_builds: Sequence[RtxBuild] = ()) -> bool:
        """No gating stage failed (advisory ones are reported, not enforced), and no
        required TensorRT-RTX build failed."""
        return all(s.status != "failed" or not s.gating for s in self.stages) and not failed_builds

    def _record(self, name: str, out: np.ndarray, ref: np.ndarray) -> None:
        self.diffs[name] = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
        self.logits[name] = np.asarray(out)
