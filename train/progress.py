"""tqdm progress bars that stay readable in logs (fewer refreshes when not a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], **kwargs: Any) -> tqdm:
    """``tqdm(iterable)`` on stderr; redraws at most every 30 s when stderr is not a TTY."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, **kwargs)
