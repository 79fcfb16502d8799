"""Output parity between pipeline stages, in the shape of ``parity.json``.

Every comparison is one *stage* object: ``name``, ``reference``, ``status``
(``passed``/``failed``/``skipped``), ``reason``, ``images``, ``top1_agreement``,
``max_abs``, ``mean_abs``, ``median_abs``, ``max_rel``, ``min_required_atol`` (plus
``median_rel``, the same statistics relative to the reference's logit scale,
``accuracy``/``reference_accuracy`` and their per-class values when labels are known,
``gate``, ``thresholds`` and ``gating``).

Two gates:

* FP32 stages (``gate: "elementwise"``) follow Polygraphy's semantics: a statistic fails
  only when it exceeds the absolute tolerance *and* its relative counterpart exceeds the
  relative tolerance; the "minimum required tolerance" is the statistic itself.
* Reduced-precision stages (``gate: "accuracy"``, FP16/INT8) are judged by what a user of
  a classifier relies on, over every image: top-1 agreement with the FP32 reference, and
  labelled top-1 accuracy no further below the reference's than allowed
  (:class:`AccuracyGate`). Their element-wise statistics are reported, not enforced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

# Polygraphy's rel diff divides by |reference|; this floor keeps exact zeros finite.
REL_EPS = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """``min_top1`` agreement, plus an error statistic (``max`` or ``median``) that must be
    within ``atol`` (absolute) or, when ``rtol`` is set, within ``rtol`` (relative)."""

    kind: ClassVar[str] = "elementwise"
    min_top1: float = 1.0
    stat: str = "max"
    atol: float = 1e-3
    rtol: float | None = None

    def check(
        self, stats: dict[str, Any], ref: np.ndarray, out: np.ndarray, where: Where
    ) -> list[str]:
        """What fails this gate: top-1 agreement, then the statistic over both tolerances
        (Polygraphy's rule), naming the image and output with the largest difference."""
        problems = []
        if stats["top1_agreement"] < self.min_top1:
            problems.append(f"top-1 agreement {stats['top1_agreement']:.4%} < {self.min_top1:.2%}")
        abs_val, rel_val = stats[f"{self.stat}_abs"], stats[f"{self.stat}_rel"]
        if abs_val > self.atol and (self.rtol is None or rel_val > self.rtol):
            rel = f" and {self.stat} rel diff {rel_val:.3g} > {self.rtol:g}" if self.rtol else ""
            i, j = (int(v) for v in np.unravel_index(int(np.abs(out - ref).argmax()), ref.shape))
            problems.append(
                f"{self.stat} abs diff {abs_val:.3g} > {self.atol:g}{rel} (the largest: "
                f"image {where.image(i)}, output {where.output(j)}: {out[i, j]:.6g} vs "
                f"{ref[i, j]:.6g})"
            )
        return problems

    def record(self, images: int) -> dict[str, Any]:
        """The thresholds as parity.json and the bundle keep them."""
        return asdict(self)


@dataclass(frozen=True)
class AccuracyGate:
    """Reduced-precision gate: ``min_agreement`` top-1 agreement with the reference, and
    labelled top-1 accuracy at most ``max_accuracy_drop`` (a fraction: 0.005 = 0.5 points)
    below the reference's - or ``small_set_drop_images`` images when the set has fewer
    than ``small_set_images`` images (one image is already more than 0.5 points there).

    On such a small set 99.5% agreement allows no flip at all (153 images: one flip is
    0.65%), so there the flips are judged by what they do to labelled answers: at most
    ``small_set_drop_images`` flips may *break* a correct reference answer (flips that fix
    a wrong one never buy more), the net accuracy drop stays within the allowed drop, and
    agreement must still reach ``small_set_min_agreement`` (a floor against a model that
    reshuffles many answers; it only ever lowers ``min_agreement``, never raises it)."""

    kind: ClassVar[str] = "accuracy"
    stat: ClassVar[str] = "median"  # the element-wise statistic reported beside it
    min_agreement: float = 0.995
    max_accuracy_drop: float = 0.005
    small_set_images: int = 200
    small_set_drop_images: int = 1
    small_set_min_agreement: float = 0.98

    def agreement_floor(self, images: int) -> float:
        """The top-1 agreement required on a set of ``images`` images."""
        if images < self.small_set_images:
            return min(self.min_agreement, self.small_set_min_agreement)
        return self.min_agreement

    def allowed_drop(self, images: int) -> float:
        """The accuracy drop (fraction) allowed on a set of ``images`` images."""
        if images < self.small_set_images and self.small_set_drop_images:
            return max(self.max_accuracy_drop, self.small_set_drop_images / images)
        return self.max_accuracy_drop

    def check(
        self, stats: dict[str, Any], ref: np.ndarray, out: np.ndarray, where: Where
    ) -> list[str]:
        """What fails this gate: agreement under the floor, too many broken answers on a
        small set, labelled accuracy too far below the reference's (needs the labels'
        statistics in ``stats``)."""
        if "accuracy_drop" not in stats:
            raise ValueError(f"{where.stage}: the accuracy gate needs the images' labels")
        images, problems = stats["images"], []
        floor = self.agreement_floor(images)
        small = images < self.small_set_images
        flips = f" ({stats['flips_break']} flips break, {stats['flips_fix']} fix)" if small else ""
        if stats["top1_agreement"] < floor:
            problems.append(f"top-1 agreement {stats['top1_agreement']:.4%} < {floor:.2%}{flips}")
        if small and stats["flips_break"] > self.small_set_drop_images:
            problems.append(
                f"{stats['flips_break']} flips break a correct reference answer (allowed "
                f"{self.small_set_drop_images} on a set of {images} images)"
            )
        allowed = self.allowed_drop(images)
        if stats["accuracy_drop"] > allowed + 1e-12:
            problems.append(
                f"accuracy {stats['accuracy']:.2%} is {100 * stats['accuracy_drop']:.2f} points "
                f"below the reference's {stats['reference_accuracy']:.2%} "
                f"(allowed {100 * allowed:.2f})"
            )
        return problems

    def record(self, images: int) -> dict[str, Any]:
        """The thresholds as parity.json and the bundle keep them, with what they came to
        on this set."""
        floor = self.agreement_floor(images)
        return {**asdict(self), "allowed_drop": self.allowed_drop(images), "agreement_floor": floor}


class Gate(Protocol):
    """A stage's gate judges itself: its ``kind`` (parity.json's ``gate``), the
    element-wise statistic it reports, what fails it, and its thresholds as recorded."""

    kind: ClassVar[str]

    @property
    def stat(self) -> str: ...

    def check(
        self, stats: dict[str, Any], ref: np.ndarray, out: np.ndarray, where: Where
    ) -> list[str]: ...

    def record(self, images: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Where:
    """How a verdict names an image and an output: by file name and class when known."""

    stage: str
    names: Sequence[str] | None = None
    classes: Sequence[str] | None = None

    def image(self, i: int) -> str:
        return self.names[i] if self.names is not None and i < len(self.names) else f"#{i}"

    def output(self, j: int) -> str:
        return self.classes[j] if self.classes and j < len(self.classes) else str(j)


def gate_from_record(kind: str, thresholds: dict[str, Any]) -> Gate:
    """The gate a stage was judged with, from parity.json's or the bundle's record."""
    cls: type[Thresholds] | type[AccuracyGate] = AccuracyGate if kind == "accuracy" else Thresholds
    keys = cls.__dataclass_fields__
    return cls(**{k: v for k, v in thresholds.items() if k in keys})


# FP32 stages: every logit within 1e-3 and the same top-1 everywhere.
FP32_GATE = Thresholds(min_top1=1.0, stat="max", atol=1e-3)
# FP16 stages (Polygraphy's FP16 guidance): the bulk of the outputs, not the worst element.
# Reported for them (advisory); they gate on ACCURACY_GATE.
FP16_GATE = Thresholds(min_top1=0.995, stat="median", atol=1e-3, rtol=1e-3)
ACCURACY_GATE = AccuracyGate()


@dataclass
class Stage:
    """One stage compared with its reference."""

    name: str
    reference: str
    status: str = "skipped"
    reason: str = ""
    images: int = 0
    top1_agreement: float | None = None
    max_abs: float | None = None
    mean_abs: float | None = None
    median_abs: float | None = None
    max_rel: float | None = None
    median_rel: float | None = None
    min_required_atol: float | None = None
    logit_scale: float | None = None
    max_abs_scaled: float | None = None
    median_abs_scaled: float | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None
    accuracy_drop: float | None = None
    flips_break: int | None = None  # reference right, this stage wrong
    flips_fix: int | None = None  # reference wrong, this stage right
    per_class_accuracy: dict[str, float] | None = None
    reference_per_class_accuracy: dict[str, float] | None = None
    gate: str = "elementwise"
    thresholds: dict[str, Any] = field(default_factory=dict)
    gating: bool = True
    fallback: dict[str, Any] | None = None
    nonfinite: int = 0  # NaN or infinite values among this stage's outputs (a failure)
    localized: dict[str, Any] | None = None  # its first divergent layer, when it failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diff_stats(reference: np.ndarray, output: np.ndarray, stat: str = "max") -> dict[str, Any]:
    """Per-element |diff| statistics and top-1 agreement of two [N, C] logit arrays."""
    reference = np.asarray(reference, dtype=np.float64)
    output = np.asarray(output, dtype=np.float64)
    if reference.shape != output.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs output {output.shape}")
    if reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(f"expected [N>0, C] logits, got {reference.shape}")
    absdiff = np.abs(output - reference)
    rel = absdiff / np.maximum(np.abs(reference), REL_EPS)
    agree = reference.argmax(axis=1) == output.argmax(axis=1)
    stats = {
        "images": int(reference.shape[0]),
        "top1_agreement": float(agree.mean()),
        "max_abs": float(absdiff.max()),
        "mean_abs": float(absdiff.mean()),
        "median_abs": float(np.median(absdiff)),
        "max_rel": float(rel.max()),
        "median_rel": float(np.median(rel)),
    }
    # Polygraphy: the smallest atol with which the checked statistic would pass.
    stats["min_required_atol"] = stats[f"{stat}_abs"]
    # The same error relative to how large these logits are (RMS of the reference).
    scale = float(np.sqrt(np.mean(reference**2)))
    stats["logit_scale"] = scale
    stats["max_abs_scaled"] = stats["max_abs"] / max(scale, REL_EPS)
    stats["median_abs_scaled"] = stats["median_abs"] / max(scale, REL_EPS)
    return stats


def first_nonfinite(logits: np.ndarray, where: Where) -> tuple[int, str]:
    """How many values of the [N, C] ``logits`` are NaN or infinite, and where the first
    one is (its image's name or index, its output's class or index, its value)."""
    bad = ~np.isfinite(logits)
    if not bad.any():
        return 0, ""
    i, j = (int(v) for v in np.argwhere(bad)[0])
    return int(bad.sum()), f"image {where.image(i)}, output {where.output(j)} = {logits[i, j]}"


def accuracy_stats(
    reference: np.ndarray, output: np.ndarray, labels: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Labelled top-1 accuracy of the output and of its reference, overall and per class."""
    labels = np.asarray(labels)
    if len(labels) != len(output):
        raise ValueError(f"{len(labels)} labels for {len(output)} outputs")

    def per_class(logits: np.ndarray) -> dict[str, float]:
        hit = np.asarray(logits).argmax(1) == labels
        return {
            c: float(hit[labels == i].mean()) for i, c in enumerate(classes) if (labels == i).any()
        }

    hit = np.asarray(output).argmax(1) == labels
    ref_hit = np.asarray(reference).argmax(1) == labels
    acc, ref_acc = float(hit.mean()), float(ref_hit.mean())
    return {
        "accuracy": acc,
        "reference_accuracy": ref_acc,
        "accuracy_drop": ref_acc - acc,
        "flips_break": int((ref_hit & ~hit).sum()),
        "flips_fix": int((~ref_hit & hit).sum()),
        "per_class_accuracy": per_class(output),
        "reference_per_class_accuracy": per_class(reference),
    }


def judge(
    name: str,
    reference: str,
    ref: np.ndarray,
    out: np.ndarray,
    gate: Gate = FP32_GATE,
    gating: bool = True,
    labels: np.ndarray | None = None,
    classes: list[str] | None = None,
    names: Sequence[str] | None = None,
) -> Stage:
    """Compare and apply ``gate``; a failed stage names the numbers that failed.

    A NaN or infinity in either side's logits fails the stage whatever the gate, naming
    the first one's image (``names``, else its index) and output; the statistics are then
    those of the finite values (non-finite ones counted as 0).

    ``gate`` judges itself (:class:`Gate`): element-wise (:class:`Thresholds`, FP32
    stages) or accuracy-based (:class:`AccuracyGate`, reduced precision; needs
    ``labels``). With ``labels`` the
    stage also carries labelled accuracy of both sides. A non-``gating`` (advisory)
    stage is judged and reported the same way but does not block publishing.
    """
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    where = Where(name, names, classes)
    problems, nonfinite = [], 0
    for side, logits in ((f"reference ({reference})", ref), ("output", out)):
        count, first = first_nonfinite(logits, where)
        if count:
            problems.append(f"{count} non-finite {side} value(s), the first: {first}")
            nonfinite += count if side == "output" else 0
    if problems:
        ref, out = (
            np.nan_to_num(ref, nan=0.0, posinf=0.0, neginf=0.0),
            np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0),
        )
    stats = diff_stats(ref, out, gate.stat)
    if labels is not None:
        stats.update(accuracy_stats(ref, out, labels, classes or []))
    problems += gate.check(stats, ref, out, where)
    return Stage(
        name=name,
        reference=reference,
        status="failed" if problems else "passed",
        reason="; ".join(problems),
        gate=gate.kind,
        thresholds=gate.record(stats["images"]),
        gating=gating,
        nonfinite=nonfinite,
        **stats,
    )


def skipped(name: str, reference: str, reason: str) -> Stage:
    """A stage that could not run here, with the reason (never silently dropped)."""
    return Stage(name=name, reference=reference, status="skipped", reason=reason)


def format_stage(s: Stage) -> str:
    """One human line per stage."""
    if s.status == "skipped":
        return f"{s.name:>18s} vs {s.reference:<16s} skipped: {s.reason}"
    status = s.status.upper() if s.gating else f"{s.status} (advisory)"
    line = (
        f"{s.name:>18s} vs {s.reference:<16s} {status:6s} images {s.images}  "
        f"top-1 agree {s.top1_agreement:.2%}  max|d| {s.max_abs:.3g}  "
        f"median|d| {s.median_abs:.3g}  median rel {s.median_rel:.3g}"
    )
    if s.accuracy is not None:
        line += f"  accuracy {s.accuracy:.2%} (reference {s.reference_accuracy:.2%})"
    return line + (f"  ({s.reason})" if s.reason else "")
