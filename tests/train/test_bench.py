"""``make bench-train``'s summary and ``--merge`` (adding seeds to an earlier report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.tools.time_to_accuracy import merge_previous, summarize_recipes


def _run(recipe: str, seed: int, acc: float, to95: float | None, total: float) -> dict:
    label = recipe.removeprefix("antsbees_")
    return {
        "name": f"{label}-efficientnet_lite0-s{seed}",
        "status": "done",
        "recipe": recipe,
        "arch": "efficientnet_lite0",
        "seed": seed,
        "best_val_acc": acc,
        "seconds_total": total,
        "seconds_to_acc": {"0.90": 10.0, "0.93": 20.0, "0.95": to95},
    }


def test_summary_is_mean_std_and_time_over_the_seeds_that_reached() -> None:
    runs = [
        _run("antsbees_tutorial", 0, 0.93, None, 600),
        _run("antsbees_tutorial", 1, 0.95, 300.0, 700),
        {"name": "tutorial-resnet18", "status": "skipped", "reason": "offline"},
    ]
    (row,) = summarize_recipes(runs)
    assert row["best_val_acc_mean"] == pytest.approx(0.94)
    assert row["best_val_acc_std"] == pytest.approx(0.01414, abs=1e-4)
    assert row["seconds_to_acc"]["0.95"] == {"seconds_mean": 300.0, "reached": 1}
    assert row["seconds_total_mean"] == 650.0 and row["seeds"] == [0, 1]


def test_merge_keeps_earlier_runs_it_does_not_repeat(tmp_path: Path) -> None:
    previous = tmp_path / "train-latest.json"
    old = {
        "date": "2026-12-01T13:13:33",
        "time_to_accuracy": [
            _run("antsbees_tutorial", 0, 0.93, None, 686),
            _run("antsbees_tutorial", 1, 0.90, None, 999),  # repeated below: replaced
            _run("antsbees_finetune", 0, 0.96, 34.0, 67),
        ],
        "cifar_speed": [{"arch": "resnet20"}],
    }
    previous.write_text(json.dumps(old))
    new = {**_run("antsbees_tutorial", 1, 0.94, None, 690), "date": "2026-12-01T16:00:00"}
    report = {"date": "now", "time_to_accuracy": [new], "cifar_speed": []}
    merge_previous(report, previous)
    names = [(r["name"], r["date"], r["best_val_acc"]) for r in report["time_to_accuracy"]]
    assert names == [
        ("tutorial-efficientnet_lite0-s0", "2026-12-01T13:13:33", 0.93),
        ("tutorial-efficientnet_lite0-s1", "2026-12-01T16:00:00", 0.94),
        ("finetune-efficientnet_lite0-s0", "2026-12-01T13:13:33", 0.96),
    ]
    assert report["cifar_speed"] == [{"arch": "resnet20"}]
    assert report["merged_with"] == "2026-12-01T13:13:33"
    # Nothing to merge: the report is left as it is.
    alone = {"date": "now", "time_to_accuracy": [new], "cifar_speed": []}
    merge_previous(alone, tmp_path / "missing.json")
    assert alone["time_to_accuracy"] == [new] and "merged_with" not in alone
