"""Output parity between pipeline stages, in the shape of ``parity.json``.

Every comparison is one *stage* object: ``name``, ``reference``, ``status``
(``passed``/``failed``/``skipped``), ``reason``, ``images``, ``top1_agreement``,
``max_abs``, ``mean_abs``, ``median_abs``, ``max_rel``, ``min_required_atol`` (plus
``median_rel``, ``thresholds`` and ``gating``).

Checks follow Polygraphy's semantics: a statistic fails only when it exceeds the absolute
tolerance *and* its relative counterpart exceeds the relative tolerance; the "minimum
required tolerance" is the statistic itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Polygraphy's rel diff divides by |reference|; this floor keeps exact zeros finite.
REL_EPS = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """``min_top1`` agreement, plus an error statistic (``max`` or ``median``) that must be
    within ``atol`` (absolute) or, when ``rtol`` is set, within ``rtol`` (relative)."""

    min_top1: float = 1.0
    stat: str = "max"
    atol: float = 1e-3
    rtol: float | None = None


# FP32 stages: every logit within 1e-3 and the same top-1 everywhere.
FP32_GATE = Thresholds(min_top1=1.0, stat="max", atol=1e-3)
# FP16 stages (Polygraphy's FP16 guidance): the bulk of the outputs, not the worst element.
FP16_GATE = Thresholds(min_top1=0.995, stat="median", atol=1e-3, rtol=1e-3)


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
    thresholds: dict[str, Any] = field(default_factory=dict)
    gating: bool = True

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
    return stats


def judge(
    name: str,
    reference: str,
    ref: np.ndarray,
    out: np.ndarray,
    gate: Thresholds = FP32_GATE,
    gating: bool = True,
) -> Stage:
    """Compare and apply ``gate``; a failed stage names the numbers that failed.

    A non-``gating`` (advisory) stage is judged and reported the same way but does not
    block publishing (e.g. FP16 stages when the published model runs in FP32).
    """
    stats = diff_stats(ref, out, gate.stat)
    problems = []
    if stats["top1_agreement"] < gate.min_top1:
        problems.append(f"top-1 agreement {stats['top1_agreement']:.4%} < {gate.min_top1:.2%}")
    abs_val, rel_val = stats[f"{gate.stat}_abs"], stats[f"{gate.stat}_rel"]
    abs_bad = abs_val > gate.atol
    rel_bad = gate.rtol is None or rel_val > gate.rtol
    if abs_bad and rel_bad:
        rel_text = f" and {gate.stat} rel diff {rel_val:.3g} > {gate.rtol:g}" if gate.rtol else ""
        problems.append(f"{gate.stat} abs diff {abs_val:.3g} > {gate.atol:g}{rel_text}")
    status = "failed" if problems else "passed"
    reason = "; ".join(problems)
    return Stage(
        name=name,
        reference=reference,
        status=status,
        reason=reason,
        thresholds=asdict(gate),
        gating=gating,
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
    return line + (f"  ({s.reason})" if s.reason else "")
