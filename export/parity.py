"""Output parity between pipeline stages, in the shape of ``parity.json``.

Every comparison is one *stage* object: ``name``, ``reference``, ``status``
(``passed``/``failed``/``skipped``), ``reason``, ``images``, ``top1_agreement``,
``max_abs``, ``mean_abs``, ``median_abs``, ``max_rel``, ``min_required_atol``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Polygraphy's rel diff divides by |reference|; this floor keeps exact zeros finite.
REL_EPS = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """A stage passes when top-1 agreement >= ``min_top1`` and max |diff| <= ``max_abs``."""

    min_top1: float = 1.0
    max_abs: float | None = 1e-3
    max_median_abs: float | None = None


FP32_GATE = Thresholds(min_top1=1.0, max_abs=1e-3)


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
    min_required_atol: float | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diff_stats(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
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
    return {
        "images": int(reference.shape[0]),
        "top1_agreement": float(agree.mean()),
        "max_abs": float(absdiff.max()),
        "mean_abs": float(absdiff.mean()),
        "median_abs": float(np.median(absdiff)),
        "max_rel": float(rel.max()),
        # Polygraphy: the smallest atol with which every element would compare equal.
        "min_required_atol": float(absdiff.max()),
    }


def judge(
    name: str, reference: str, ref: np.ndarray, out: np.ndarray, gate: Thresholds = FP32_GATE
) -> Stage:
    """Compare and apply ``gate``; a failed stage names the numbers that failed."""
    stats = diff_stats(ref, out)
    problems = []
    if stats["top1_agreement"] < gate.min_top1:
        problems.append(f"top-1 agreement {stats['top1_agreement']:.4%} < {gate.min_top1:.2%}")
    if gate.max_abs is not None and stats["max_abs"] > gate.max_abs:
        problems.append(f"max abs diff {stats['max_abs']:.3g} > {gate.max_abs:g}")
    if gate.max_median_abs is not None and stats["median_abs"] > gate.max_median_abs:
        problems.append(f"median abs diff {stats['median_abs']:.3g} > {gate.max_median_abs:g}")
    return Stage(
        name=name,
        reference=reference,
        status="failed" if problems else "passed",
        reason="; ".join(problems),
        thresholds=asdict(gate),
        **stats,
    )


def skipped(name: str, reference: str, reason: str) -> Stage:
    """A stage that could not run here, with the reason (never silently dropped)."""
    return Stage(name=name, reference=reference, status="skipped", reason=reason)


def format_stage(s: Stage) -> str:
    """One human line per stage."""
    if s.status == "skipped":
        return f"{s.name:>18s} vs {s.reference:<16s} skipped: {s.reason}"
    line = (
        f"{s.name:>18s} vs {s.reference:<16s} {s.status.upper():6s} images {s.images}  "
        f"top-1 agree {s.top1_agreement:.2%}  max|d| {s.max_abs:.3g}  "
        f"median|d| {s.median_abs:.3g}  max rel {s.max_rel:.3g}"
    )
    return line + (f"  ({s.reason})" if s.reason else "")
