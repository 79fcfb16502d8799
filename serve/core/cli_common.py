"""The command-line pattern of the three stages (torch-free): ``python -m <stage>
<command> [options]`` with argparse subcommands, shared argument helpers, logging on
stderr (results on stdout), and one mapping from errors to exit codes:

* 0 - done;
* 1 - a bug: anything that is not one of the project's errors (a ``KeyError``, a
  ``TypeError``, a bare ``ValueError``...): ``error: internal error ...`` and the full
  traceback;
* 2 - bad input, usage or environment the user can fix (a :class:`UserError`: a bad
  flag value, a corrupt image, a bad config, no server...; or an ``OSError``: a missing
  file, a full disk, a permission denied): one ``error: ...`` line, no traceback
  (``TRAINSERVE_DEBUG=1`` shows it);
* 3 - a quality gate refused (:class:`GateRefused`: parity, accuracy): the numbers are
  printed before;
* 130 - interrupted.

The error classes live in :mod:`serve.core.errors` (the root, ``TrainServeError``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from serve.backend.errors import UsageError, UserError
from serve.core.errors import GateRefused

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

log = logging.getLogger("trainserve")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help, arguments and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str = ""


PROJECT_LOGGERS = ("train", "export", "serve", "trainserve")


def setup_logging(level: int = logging.INFO) -> None:
    """Status lines on stderr, one per message (stdout stays clean for results): this
    project's loggers at ``level``, other libraries' at WARNING."""
    root = logging.getLogger()
    if not any(getattr(h, "_trainserve", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._trainserve = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


class Parser(argparse.ArgumentParser):
    """Usage errors (an unknown flag, ``--precision int9``) are one ``error:`` line naming
    the problem and the valid choices, not the whole usage block first; exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where it informs: not when the help already names the
    default, nor for an empty or unset default, nor for on/off switches (``--no-publish``
    would read "(default: True)", the value of its destination, not of the flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        switch = isinstance(
            action,
            argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._StoreConstAction,
        )
        if (
            switch
            or "(default" in text.lower()
            or action.default in (None, "", [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return action.help
        return super()._get_help_string(action)


def build_parser(
    prog: str, description: str, commands: Sequence[Command], only: str | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with one subparser per command (informative defaults shown in
    --help, :class:`HelpFormatter`). ``only``: the command about to run; the others get
    no arguments (their help line is enough, and declaring a command's arguments may
    import its heavy modules: ``--help`` stays fast)."""
    parser = Parser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in commands:
        p = sub.add_parser(
            c.name,
            help=c.help,
            description=c.description or c.help,
            formatter_class=HelpFormatter,
        )
        if only is None or c.name == only:
            c.add_arguments(p)
        p.set_defaults(_run=c.run)
    return parser


def main(
    prog: str,
    description: str,
    commands: Sequence[Command],
    argv: Sequence[str] | None = None,
    default: str | None = None,
) -> int:
    """Parse ``argv`` (``default`` is the command when none is named), run, map errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {c.name for c in commands}
    top_level_help = argv[:1] in (["-h"], ["--help"])
    if default and not top_level_help and (not argv or argv[0] not in names):
        argv = [default, *argv]
    setup_logging()

    chosen = argv[0] if argv and argv[0] in names else (default if top_level_help else None)

    def parse_and_run() -> int | None:  # the parser too: its defaults read the environment
        parser = build_parser(prog, description, commands, only=chosen or "")
        if default and top_level_help:  # the default command's options, not only the list
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            print(parser.format_help())
            print(f"`{prog} [options]` runs `{prog} {default}`; its options:\n")
            print(sub.choices[default].format_help(), end="")
            return EXIT_OK
        args = parser.parse_args(argv)
        return args._run(args)

    return run_guarded(parse_and_run)


def tool_main(
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """A tool module's own ``python -m`` entry (the old spelling of a stage subcommand):
    the same flags, logging and exit codes as the subcommand."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run_guarded(lambda: run(args))


def run_guarded(fn: Callable[[], int | None]) -> int:
    """Run ``fn`` and turn exceptions into the exit codes of the module docstring."""
    debug = os.environ.get("TRAINSERVE_DEBUG", "") not in ("", "0")
    try:
        code = fn()
        return EXIT_OK if code is None else int(code)
    except GateRefused as e:
        log.error("error: %s", e)
        return EXIT_GATE
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except (UserError, OSError) as e:  # the user's input, usage or environment
        if debug:
            log.exception("error: %s", e)
        else:
            log.error("error: %s", e)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - anything else is a bug: say so, with the trace
        log.exception(
            "error: internal error (a bug; please report it): %s: %s", type(e).__name__, e
        )
        return EXIT_BUG


# -- shared arguments --------------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    """An integer from the environment (make variables), else ``default``."""
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {value!r}") from None


def add_model_repository(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, default: str = "model_repository"
) -> None:
    p.add_argument(
        "--model-repository",
        dest="model_repository",
        default=default,
        metavar="DIR",
        help="Triton model repository",
    )


def add_url(p: argparse.ArgumentParser, protocols: bool = True) -> None:
    """``--url HOST:PORT`` (and ``--protocol``) of a running server."""
    p.add_argument(
        "--url",
        default=None,
        help="HOST:PORT of the server (default 127.0.0.1:$GRPC_PORT for grpc, "
        "127.0.0.1:$HTTP_PORT for http)",
    )
    if protocols:
        p.add_argument(
            "--protocol",
            choices=("grpc", "http"),
            default="grpc",
            help="the server's API to use (the default --url follows it)",
        )


def add_admin_key(p: argparse.ArgumentParser) -> None:
    """``--admin-key-file``: the key of the server's restricted (control) APIs."""
    p.add_argument(
        "--admin-key-file",
        default=None,
        metavar="FILE",
        help="file holding the server's admin key (default: $TRAINSERVE_ADMIN_KEY, else "
        "the key file `serve run` wrote for this port)",
    )
