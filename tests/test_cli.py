"""One CLI pattern for the three stages: `python -m <stage> <command>`, --help everywhere,
one error line and exit 2 for bad input, no tracebacks; a bug (any exception outside the
project's root, serve.core.errors.TrainServeError) exits 1 with its traceback."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import subprocess

import pytest

from export.cli import COMMANDS as EXPORT
from serve.cli import COMMANDS as SERVE
from tests.helpers import PY, ROOT, run_cli
from train.cli import COMMANDS as TRAIN

EVERY = [["train"], ["export"], ["serve"]] + [
    [stage, c.name] for stage, commands in (("train", TRAIN), ("export", EXPORT), ("serve", SERVE))
    for c in commands
]  # fmt: skip


@pytest.mark.parametrize("args", EVERY, ids=" ".join)
def test_help(args: list[str]) -> None:
    """Every --help works with torch unimportable: no command's help imports it."""
    stage, *rest = args
    code = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
        f"from {stage}.cli import main\n"
        f"sys.exit(main({[*rest, '--help']!r}))\n"
    )
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m "), proc.stdout[:500]


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
    `--no-publish ... (default: True)`, and every option and positional of every command
    explains itself."""
    from serve.core.cli_common import build_parser

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
        for action in p._actions:
            what = f"{stage} {name} {action.option_strings or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help"


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


# -- one error root: user errors exit 2 in one line, anything else is a bug (exit 1) -------


def _raising_cli(raise_: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A one-command CLI on ``serve.core.cli_common.main`` whose command runs ``raise ...``."""
    code = (
        "import sys\n"
        "from serve.core.cli_common import Command, main\n"
        "from serve.backend.errors import *  # noqa: F403\n"
        "from serve.core.errors import *  # noqa: F403\n"
        "from serve.core.card_reader import CardError\n"
        "from serve.core.files import WriteError\n"
        f"def run(args):\n    raise {raise_}\n"
        "command = Command('go', 'raise', lambda p: None, run)\n"
        "sys.exit(main('python -m demo', 'demo', [command], ['go']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRAINSERVE_DEBUG"} | (env or {})
    return subprocess.run(
        [PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("raise_", "code", "line"),
    [
        ("UsageError('--flag must be >= 1, got 0')", 2, "error: --flag must be >= 1, got 0"),
        ("UserError('no such thing')", 2, "error: no such thing"),
        ("SetupError('no CUDA device')", 2, "error: no CUDA device"),
        ("CardError('card.crop is missing')", 2, "error: card.crop is missing"),
        ("ServerUnavailable('no Triton server at x')", 2, "error: no Triton server at x"),
        ("WriteError('cannot write f: no space left')", 2, "error: cannot write f: no space left"),
        ("FileNotFoundError('x does not exist')", 2, "error: x does not exist"),
        ("PermissionError(13, 'Denied', 'f')", 2, "error: [Errno 13] Denied: 'f'"),
        ("GateRefused('parity failed')", 3, "error: parity failed"),
        ("KeyboardInterrupt()", 130, "interrupted"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_without_a_traceback(raise_: str, code: int, line: str) -> None:
    proc = _raising_cli(raise_)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == line + "\n" and proc.stdout == ""


@pytest.mark.parametrize(
    "raise_", ["KeyError('arch')", "TypeError('operand')", "ValueError('bare')", "OverflowError()"]
)  # fmt: skip
def test_anything_else_is_a_bug_with_its_traceback(raise_: str) -> None:
    proc = _raising_cli(raise_)
    assert proc.returncode == 1, proc.stderr
    kind = raise_.split("(")[0]
    assert proc.stderr.startswith(f"error: internal error (a bug; please report it): {kind}")
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(kind)


def test_trainserve_debug_shows_a_user_errors_traceback() -> None:
    proc = _raising_cli("UsageError('bad value')", env={"TRAINSERVE_DEBUG": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: bad value\n") and "Traceback" in proc.stderr


def test_env_int_names_a_bad_make_variable() -> None:
    """`HTTP_PORT=abc python -m serve ...`: the parser's defaults are guarded too."""
    proc = run_cli("serve", "run", env={"HTTP_PORT": "abc"}, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: HTTP_PORT must be an integer, got 'abc'\n"


def _project_exception_classes() -> list[type]:
    found = []
    for package in ("train", "export", "serve"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.stem in ("__main__", "classifier_model", "preprocess_model"):
                continue  # the Triton models import triton_python_backend_utils
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            module = importlib.import_module(name)
            found += [
                obj
                for obj in vars(module).values()
                if inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
            ]
    return found


def test_settings_of_the_wrong_type_are_one_line() -> None:
    """YAML reads ``1e-3`` as a string: it is a number all the same; a word where a number
    belongs is one error line naming the setting (it was a TypeError in validate, which
    the error root turns into a bug's traceback and exit 1)."""
    from serve.backend.errors import UsageError
    from train.config import parse_sets, resolve_config

    assert resolve_config(overrides=parse_sets(["lr=1e-3", "epochs=3.0"])).lr == 0.001
    assert resolve_config(overrides=parse_sets(["epochs=3.0"])).epochs == 3
    for item, message in (
        ("epochs=ten", "epochs must be an integer, got 'ten'"),
        ("lr=abc", "lr must be a number, got 'abc'"),
        ("amp=3", "amp must be one of none, bf16, fp16, got 3"),
    ):
        with pytest.raises(UsageError, match=message):
            resolve_config(overrides=parse_sets([item]))


def test_every_project_exception_has_the_one_root() -> None:
    from serve.backend.errors import TrainServeError, UserError
    from serve.core.errors import GateRefused

    classes = _project_exception_classes()
    assert len(classes) >= 25  # the walk found them (30 when written)
    assert [c.__name__ for c in classes if not issubclass(c, TrainServeError)] == []
    # every one is a user error but the gates (exit 3)
    gates = {c.__name__ for c in classes if issubclass(c, GateRefused)}
    assert gates == {"GateRefused", "ParityFailed", "EngineParityFailed"}
    assert [c.__name__ for c in classes if not issubclass(c, UserError | GateRefused)] == [
        "TrainServeError"
    ]
