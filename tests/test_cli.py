"""Every stage is a `python -m <stage>` command with --help."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize(
    "args",
    [
        ["train"],
        ["train", "evaluate"],
        ["train", "data"],
        ["export"],
        ["serve"],
        ["serve", "run"],
        ["serve", "classify"],
    ],
)
def test_help(args: list[str]) -> None:
    proc = run_cli(*args, "--help")
    assert proc.stdout.startswith("usage: python -m ")
