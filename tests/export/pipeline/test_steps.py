"""The export run's steps state what they read and what they make: every input of a step
is a product of an earlier one, every product is made once and read later."""

from __future__ import annotations

from export.pipeline.release import STEPS


def test_every_step_reads_only_what_an_earlier_step_made() -> None:
    made = {"job"}
    for step in STEPS:
        missing = set(step.needs) - made
        assert not missing, f"{step.name} reads {sorted(missing)} before any step makes it"
        if step.gives:
            assert step.gives not in made, f"{step.name} makes {step.gives!r} again"
            made.add(step.gives)
    assert STEPS[-1].gives == "result"


def test_every_product_is_read_by_a_later_step() -> None:
    for i, step in enumerate(STEPS[:-1]):
        if step.gives:
            readers = [s.name for s in STEPS[i + 1 :] if step.gives in s.needs]
            assert readers, f"{step.name} makes {step.gives!r}, which no later step reads"


def test_the_order_is_the_documented_one() -> None:
    """Parity before the card, the card before the Triton check, the report before the
    gate, the gate before publishing: nothing is published before it is judged."""
    names = [s.name for s in STEPS]
    order = ["reference_outputs", "check_onnxruntime", "fallback_step", "make_card"]
    order += ["check_triton", "write_reports", "gate", "publish_release", "deploy_release"]
    assert [n for n in names if n in order] == order
