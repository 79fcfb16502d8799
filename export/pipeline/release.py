"""The export run: checkpoint -> ONNX (FP32, FP16, INT8) [-> TensorRT engine] -> parity of
every stage on every val image -> TensorRT-RTX builds of every ONNX -> report -> publish
when every gating stage passed -> deploy to a live server when asked (``--deploy URL``).

:func:`run_export` is the run, one typed call per step in order: each step takes what it
reads (``job`` is the run's inputs, from :func:`start`) and returns what it makes, so a
reader and the type checker follow every product from where it is made to where it is
read. Only the ``ledger`` (the parity record, export/pipeline/ledger.py) is extended
after it is made: stages append their verdicts to it, and the fallback and speed gate
revise theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from export.pipeline.build import (
    build_tensorrt_rtx,
    check_onnxruntime,
    check_tensorrt,
    export_models,
    reference_outputs,
    start,
)
from export.pipeline.config import ExportConfig
from export.pipeline.job import ExportJob
from export.pipeline.ledger import Ledger
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
from export.triton.publish import Published

__all__ = ["StepTimer", "run_export"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class StepTimer:
    """Runs a step and keeps its wall time under the step's name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.order: list[str] = []

    def __call__(self, step: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        begun = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            self.seconds[step.__name__] = time.perf_counter() - begun
            self.order.append(step.__name__)


def run_export(cfg: ExportConfig, timer: StepTimer | None = None) -> dict[str, Any]:
    """Run every step; returns the report (with ``published`` and ``served`` when they
    happened). Raises ParityFailed (after writing the report) when a gating stage failed
    and ``force`` is off. Parity comes before the card, the card before the Triton check,
    the report before the gate, the gate before publishing: nothing is published before
    it is judged."""
    step = timer or StepTimer()
    begun = time.perf_counter()
    job = step(start, cfg)
    ledger: Ledger | None = None
    report: dict[str, Any] | None = None
    published: Published | None = None
    try:
        onnx = step(export_models, job)
        ledger = step(reference_outputs, job)
        int8 = step(export_int8, job)
        step(check_onnxruntime, job, ledger, int8)
        fallback = step(fallback_step, job, ledger)
        int8_speed = step(speed_gate, job, ledger)
        engine = step(check_tensorrt, job, ledger)
        rtx_builds = step(build_tensorrt_rtx, job, int8)
        card = step(make_card, job, ledger, int8, fallback, int8_speed)
        step(check_triton, job, ledger, card, engine)
        report = step(write_reports, job, onnx, ledger, int8, rtx_builds, card, engine)
        step(gate, job, ledger, rtx_builds)
        published = step(publish_release, job, card, report, engine)
        served = step(deploy_release, job, published, report)
        return step(summary, report, published, served)
    finally:
        seconds = {**step.seconds, "total": time.perf_counter() - begun}
        _record_timings(job, ledger, report, published, seconds)


def _record_timings(
    job: ExportJob,
    ledger: Ledger | None,
    report: dict[str, Any] | None,
    published: Published | None,
    steps: dict[str, float],
) -> None:
    """Each step's and each stage's wall time: printed, and kept in ``parity.json`` (and
    the published version's copy of it) once the run is over."""
    from export.checks.report import write_json

    timings = {
        "steps_s": {k: round(v, 2) for k, v in steps.items()},
        "stages_s": {k: round(v, 2) for k, v in (ledger.seconds if ledger else {}).items()},
    }
    width = max(len(k) for k in [*timings["steps_s"], *timings["stages_s"]])
    lines = [f"  {k:<{width}} {v:7.1f} s" for k, v in timings["steps_s"].items() if v >= 0.05]
    lines += [f"    {k:<{width - 2}} {v:7.1f} s" for k, v in timings["stages_s"].items()]
    log.info("where the time went:\n%s", "\n".join(lines))
    if report is None:
        return
    report["timings"] = timings
    write_json(report, job.out_dir / "parity.json")
    if published is not None:  # the version's own record (export/triton/publish.py)
        record = published.classifier / "report" / "parity.json"
        if record.parent.is_dir():
            write_json(report, record)
