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


def _entries(help_text: str) -> list[str]:
    """The option entries of a --help text, each joined into one line."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries and line.startswith("     "):
            entries[-1] += " " + line.strip()
        else:
            entries.append("")
    return [" ".join(e.split()) for e in entries if e]


@pytest.mark.parametrize("stage", ["train", "export", "serve"])
def test_help_texts_say_each_default_once_and_truly(stage: str) -> None:
    """No "(default: )", no second "(default: X)" after a help that names its default, no
    `--no-publish ... (default: True)`, and every option of export explains itself."""
    from serve.cli_common import build_parser

    commands = {"train": TRAIN, "export": EXPORT, "serve": SERVE}[stage]
    parser = build_parser(f"python -m {stage}", "", commands)
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    for name, p in sub.choices.items():
        for entry in _entries(p.format_help()):
            where = f"{stage} {name}: {entry}"
            assert "(default: )" not in entry, where
            assert entry.count("(default") <= 1, where
            if entry.startswith("--no-"):
                assert "(default: True)" not in entry, where
    if stage == "export":
        for action in sub.choices["export"]._actions:
            assert action.help, f"export {action.option_strings} has no help"


def test_top_level_help_shows_the_default_commands_options(capsys) -> None:
    from train.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "COMMAND" in out and "evaluate" in out  # the command list
    assert "--epochs EPOCHS" in out and "--lr LR" in out and "--resume RESUME" in out


def test_a_bad_choice_is_one_line_with_the_choices(capsys) -> None:
    """`make export PRECISION=int9`: one error line naming the valid choices, no usage."""
    from export.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--precision", "int9"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --precision")
    assert "'int9'" in err and "fp32" in err and "int8" in err and "usage" not in err
