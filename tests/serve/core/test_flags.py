"""One way to bind flags to configs: a flag declared once for a field takes the field's
default, type and choices, and the config is built from the parsed flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from serve.core.flags import Flag, add_flags, build, given


@dataclass(frozen=True)
class Gate:
    min_agreement: float = 0.995
    images: int = 200


@dataclass
class Config:
    path: str
    mode: Literal["fast", "exact"] = "exact"
    rounds: int = 8
    publish: bool = True
    strict: bool = False
    targets: tuple[str, ...] = ("8.6", "12.0")
    gate: Gate = field(default_factory=Gate)


FLAGS = [
    Flag("path", "--path", "where", {"default": "x"}),
    Flag("mode", "--mode"),
    Flag("rounds", "--rounds"),
    Flag("publish", "--no-publish"),
    Flag("strict", "--strict"),
    Flag("targets", "--targets"),
    Flag("gate.min_agreement", "--min-agreement"),
]


def _parse(argv: list[str], layered: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_flags(p, Config, FLAGS, layered=layered)
    return p.parse_args(argv)


def test_defaults_types_and_nested_fields_come_from_the_config() -> None:
    cfg = build(Config, _parse([]), FLAGS)
    assert cfg == Config(path="x")
    cfg = build(
        Config,
        _parse(
            ["--mode", "fast", "--rounds", "3", "--no-publish", "--strict"]
            + ["--targets", "9.0", "--min-agreement", "0.99"]
        ),
        FLAGS,
    )
    assert (cfg.mode, cfg.rounds, cfg.publish, cfg.strict) == ("fast", 3, False, True)
    assert cfg.targets == ("9.0",) and isinstance(cfg.targets, tuple)
    assert cfg.gate == Gate(min_agreement=0.99, images=200)  # the rest keeps its default


def test_choices_come_from_the_literal_and_a_bad_value_names_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _parse(["--mode", "slow"])
    assert "invalid choice: 'slow' (choose from 'fast', 'exact')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--rounds", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_built_values_win_over_flags() -> None:
    cfg = build(Config, _parse(["--rounds", "3"]), FLAGS, rounds=5, gate=Gate(images=10))
    assert cfg.rounds == 5 and cfg.gate == Gate(images=10)


def test_layered_flags_are_only_the_given_ones() -> None:
    # (a flag with its own default keeps it: --path)
    assert given(_parse([], layered=True), FLAGS) == {"path": "x"}
    args = _parse(["--strict", "--rounds", "2", "--min-agreement", "0.9"], layered=True)
    assert given(args, FLAGS) == {
        "path": "x",
        "strict": True,
        "rounds": 2,
        "gate.min_agreement": 0.9,
    }
    p = argparse.ArgumentParser()
    add_flags(p, Config, [Flag("strict", "--strict")], layered=True)
    assert p.parse_args(["--no-strict"]).strict is False  # a recipe's True can be turned off
