"""The export run is one typed call per step, in an order that judges before it publishes
(the type checker follows each product; this checks the order and that none is skipped)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from export.pipeline import release


def _steps() -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(release.run_export)))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "step"
    ]
    calls.sort(key=lambda c: (c.lineno, c.col_offset))
    return [c.args[0].id for c in calls if isinstance(c.args[0], ast.Name)]


def test_every_step_runs_once() -> None:
    steps = _steps()
    assert len(steps) == len(set(steps)) >= 15, steps
    assert steps[0] == "start" and steps[-1] == "summary"


def test_the_order_is_the_documented_one() -> None:
    """Parity before the card, the card before the Triton check, the report before the
    gate, the gate before publishing: nothing is published before it is judged."""
    order = ["reference_outputs", "check_onnxruntime", "fallback_step", "make_card"]
    order += ["check_triton", "write_reports", "gate", "publish_release", "deploy_release"]
    assert [n for n in _steps() if n in order] == order


def test_the_timer_keeps_each_steps_time_and_its_failure() -> None:
    timer = release.StepTimer()
    assert timer(sorted, [2, 1]) == [1, 2]
    with pytest.raises(ValueError):
        timer(int, "x")
    assert timer.order == ["sorted", "int"] and set(timer.seconds) == {"sorted", "int"}
