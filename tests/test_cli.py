"""One CLI pattern for the three stages: `python -m <stage> <command>`, --help everywhere,
one error line and exit 2 for bad input, no tracebacks."""

from __future__ import annotations

import pytest

from export.cli import COMMANDS as EXPORT
from serve.cli import COMMANDS as SERVE
from tests.helpers import run_cli
from train.cli import COMMANDS as TRAIN

EVERY = [["train"], ["export"], ["serve"]] + [
    [stage, c.name] for stage, commands in (("train", TRAIN), ("export", EXPORT), ("serve", SERVE))
    for c in commands
]  # fmt: skip


@pytest.mark.parametrize("args", EVERY, ids=" ".join)
def test_help(args: list[str]) -> None:
    proc = run_cli(*args, "--help")
    assert proc.stdout.startswith("usage: python -m ")


def test_default_commands_and_recipe_lookup() -> None:
    # `python -m train --epochs 1 ...` is `python -m train train ...`
    assert "--recipe RECIPE" in run_cli("train", "--recipe", "x", "--help").stdout
    assert "--checkpoint" in run_cli("export", "--checkpoint", "x", "--help").stdout
    assert run_cli("train", "recipe", "antsbees_finetune", "--get", "model_name").stdout == (
        "antsbees\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "recipe", "no_such_recipe"], "no recipe 'no_such_recipe'"),
        (["train", "evaluate", "--checkpoint", "/nonexistent.pt"], "does not exist"),
        (["export", "--checkpoint", "/nonexistent.pt"], "does not exist"),
        (["serve", "classify", "--url", "127.0.0.1:9", "x.jpg"], "no Triton server"),
        (["serve", "models", "--url", "127.0.0.1:9"], "no Triton server"),
    ],
)
def test_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
