"""The precision fallback's search: the smallest set of FP32 nodes that passes the gate,
found by doubling then halving back, within the re-check budget - never a set it did not
check, and None when nothing passed in time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from export.checks.parity import Stage
from export.pipeline.precision_fallback import _Search


class _Probe(_Search):
    """A search whose re-check passes exactly when ``k`` nodes or more stay in FP32."""

    needed: int = 0

    def check(self, k: int) -> Stage:
        status = "passed" if k >= self.needed else "failed"
        self.tried.append({"excluded": k, "status": status})
        return Stage(name="onnxruntime-int8", reference="pytorch-fp32", status=status)


def _search(needed: int, rounds: int) -> _Probe:
    job: Any = SimpleNamespace(
        cfg=SimpleNamespace(precision=SimpleNamespace(fallback_rounds=rounds))
    )
    stage = Stage(name="onnxruntime-int8", reference="pytorch-fp32")
    probe = _Probe(job, None, stage, [], Path("m.onnx"), lambda _: None, Path("."))
    probe.needed = needed
    return probe


@pytest.mark.parametrize(
    ("needed", "rounds", "max_k", "found", "checked"),
    [
        (5, 10, 64, 5, [1, 2, 4, 8, 6, 5]),  # doubles to a pass, halves back to the edge
        (1, 10, 64, 1, [1]),  # the first set passes: nothing smaller to try
        (100, 10, 20, None, [1, 2, 4, 8, 16, 20]),  # every node in FP32 still fails
        (5, 3, 64, None, [1, 2, 4]),  # the budget ends before anything passed
    ],
)
def test_the_smallest_passing_set_within_the_budget(
    needed: int, rounds: int, max_k: int, found: int | None, checked: list[int]
) -> None:
    search = _search(needed, rounds)
    assert search.smallest_passing(max_k) == found
    assert [t["excluded"] for t in search.tried] == checked
    passed = [t["excluded"] for t in search.tried if t["status"] == "passed"]
    assert found is None or found == min(passed)  # the answer is a set that was checked


def test_a_spent_budget_keeps_the_best_pass_so_far() -> None:
    """Rounds run out while halving back: the smallest set that passed so far is kept."""
    search = _search(needed=37, rounds=8)
    # 1 2 4 8 16 32 fail, 64 passes, then 48 passes: eight checks
    assert search.smallest_passing(64) == 48
    assert [t["excluded"] for t in search.tried] == [1, 2, 4, 8, 16, 32, 64, 48]
