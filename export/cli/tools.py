"""The measuring and checking commands of ``python -m export``: bench, calibrate, tune,
warmup-bench, profile, replay, localize (each imports its module only when used)."""

from __future__ import annotations

import argparse


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from export.tools.bench import add_arguments

    add_arguments(p)


def run_bench(a: argparse.Namespace) -> int:
    from export.tools.bench import run

    return run(a)


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    from export.tools.calibration_search import add_arguments

    add_arguments(p)


def run_calibrate(a: argparse.Namespace) -> int:
    from export.tools.calibration_search import run

    return run(a)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    from export.tools.tune import add_arguments

    add_arguments(p)


def run_tune(a: argparse.Namespace) -> int:
    from export.tools.tune import run

    return run(a)


def add_warmup_bench_arguments(p: argparse.ArgumentParser) -> None:
    from export.tools.warmup_bench import add_arguments

    add_arguments(p)


def run_warmup_bench(a: argparse.Namespace) -> int:
    from export.tools.warmup_bench import run_command

    return run_command(a)


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    from export.tools.profile import add_arguments

    add_arguments(p)


def run_profile(a: argparse.Namespace) -> int:
    from export.tools.profile import run

    return run(a)


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    from export.tools.replay import add_arguments

    add_arguments(p)


def run_replay(a: argparse.Namespace) -> int:
    from export.tools.replay import run

    return run(a)


def add_localize_arguments(p: argparse.ArgumentParser) -> None:
    from export.checks.localize import add_arguments

    add_arguments(p)


def run_localize(a: argparse.Namespace) -> int:
    from export.checks.localize import run

    return run(a)
