"""The export run: checkpoint -> ONNX (FP32, FP16, INT8) [-> TensorRT engine] -> parity of
every stage on every val image -> TensorRT-RTX builds of every ONNX -> report -> publish
when every gating stage passed -> deploy to a live server when asked (``--deploy URL``).

:data:`STEPS` is the run, in order. A step's inputs are its parameters, each named for
a product of an earlier step (``job`` is the run's inputs, from :func:`start`); its
output is its return value, stored under the step's ``gives`` name. Only the
``ledger`` (the parity record, export/pipeline/ledger.py) is extended after it is made:
stages append their verdicts to it, and the fallback and speed gate revise theirs.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from export.pipeline.build import (
    build_tensorrt_rtx,
    check_onnxruntime,
    check_tensorrt,
    export_models,
    reference_outputs,
    start,
)
from export.pipeline.config import ExportConfig
from export.pipeline.outcome import (
    check_triton,
    deploy_release,
    gate,
    make_card,
    publish_release,
    summary,
    write_reports,
)
from export.pipeline.precision import export_int8
from export.pipeline.precision_fallback import fallback_step, speed_gate

__all__ = ["STEPS", "Step", "run_export"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One step: ``run(**products it names)``; its result is stored as ``gives``."""

    run: Callable[..., Any]
    gives: str = ""

    @property
    def name(self) -> str:
        return self.run.__name__

    @property
    def needs(self) -> tuple[str, ...]:
        """The products it reads: its parameters' names."""
        return tuple(inspect.signature(self.run).parameters)


STEPS: list[Step] = [
    Step(export_models, gives="onnx"),
    Step(reference_outputs, gives="ledger"),
    Step(export_int8, gives="int8"),
    Step(check_onnxruntime),
    Step(fallback_step, gives="fallback"),
    Step(speed_gate, gives="int8_speed"),
    Step(check_tensorrt, gives="engine"),
    Step(build_tensorrt_rtx, gives="rtx_builds"),
    Step(make_card, gives="card"),
    Step(check_triton),
    Step(write_reports, gives="report"),
    Step(gate),
    Step(publish_release, gives="published"),
    Step(deploy_release, gives="served"),
    Step(summary, gives="result"),
]


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Run every step; returns the report (with ``published`` and ``served`` when they
    happened). Raises ParityFailed (after writing the report) when a gating stage failed
    and ``force`` is off."""
    begun = time.perf_counter()
    products: dict[str, Any] = {"job": start(cfg)}
    steps: dict[str, float] = {"start": time.perf_counter() - begun}
    try:
        for step in STEPS:
            t = time.perf_counter()
            out = step.run(**{name: products[name] for name in step.needs})
            steps[step.name] = time.perf_counter() - t
            if step.gives:
                products[step.gives] = out
    finally:
        steps["total"] = time.perf_counter() - begun
        _record_timings(products, steps)
    return products["result"]


def _record_timings(products: dict[str, Any], steps: dict[str, float]) -> None:
    """Each step's and each stage's wall time: printed, and kept in ``parity.json`` (and
    the published version's copy of it) once the run is over."""
    from export.checks.report import write_json

    ledger = products.get("ledger")
    timings = {
        "steps_s": {k: round(v, 2) for k, v in steps.items()},
        "stages_s": {k: round(v, 2) for k, v in (ledger.seconds if ledger else {}).items()},
    }
    width = max(len(k) for k in [*timings["steps_s"], *timings["stages_s"]])
    lines = [f"  {k:<{width}} {v:7.1f} s" for k, v in timings["steps_s"].items() if v >= 0.05]
    lines += [f"    {k:<{width - 2}} {v:7.1f} s" for k, v in timings["stages_s"].items()]
    log.info("where the time went:\n%s", "\n".join(lines))
    report = products.get("report")
    if report is None:
        return
    report["timings"] = timings
    job = products["job"]
    write_json(report, job.out_dir / "parity.json")
    published = products.get("published")
    if published is not None:  # the version's own record (export/triton/publish.py)
        record = published.classifier / "report" / "parity.json"
        if record.parent.is_dir():
            write_json(report, record)
