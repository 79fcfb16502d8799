"""Hints in the form the user typed (the standard library only): a flag when they ran
``python -m ...``, a make variable when they ran ``make`` (the Makefile sets
``TRAINSERVE_MAKE`` to the target and ``TRAINSERVE_RECIPE`` to the recipe it used)."""

from __future__ import annotations

import os

# the make variable that passes extra flags to each target's command
ARGS_VARIABLE = {
    "train": "TRAIN_ARGS",
    "export": "EXPORT_ARGS",
    "bench": "BENCH_ARGS",
    "tune": "TUNE_ARGS",
    "soak": "SOAK_ARGS",
    "chaos": "CHAOS_ARGS",
}


def via_make() -> str:
    """The make target this command runs under ("" when run directly)."""
    return os.environ.get("TRAINSERVE_MAKE", "")


def recipe_args() -> str:
    """`` RECIPE=...`` when make ran a recipe other than the default, else ""."""
    recipe = os.environ.get("TRAINSERVE_RECIPE", "")
    return f" RECIPE={recipe}" if recipe and recipe != "antsbees_probe" else ""


def flag(text: str, variable: str = "", value: str = "") -> str:
    """``text`` (a flag with its value) as the user would type it: under make, the
    target's make variable ``variable=value`` when it has one, else its ``*_ARGS``."""
    target = via_make()
    if not target:
        return text
    if variable:
        return f"make {target}{recipe_args()} {variable}={value}"
    args = ARGS_VARIABLE.get(target)
    if not args:
        return text
    return f"make {target}{recipe_args()} {args}='{text}'"


def command(target: str, direct: str) -> str:
    """How to run ``target`` again: ``make target RECIPE=...`` under make, else
    ``direct`` (a ``python -m`` command line)."""
    return f"make {target}{recipe_args()}" if via_make() else direct
