"""tqdm progress bars that stay readable in logs: on a terminal, the usual bar; elsewhere
(a log file, a pipe, CI) nothing for loops shorter than 30 s, then one plain line at most
every 30 s and the final count, each on a line of its own (no carriage returns, no "0%"
lines)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LOG_INTERVAL_S = 30.0


class _Lines:
    """A text stream for tqdm that turns its in-place redraws into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable[T], **kwargs: Any) -> tqdm:
    """``tqdm(iterable)`` on stderr; a log-friendly one when stderr is not a TTY."""
    if sys.stderr.isatty():
        kwargs.setdefault("mininterval", 0.1)
        kwargs.setdefault("leave", False)
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, file=sys.stderr, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("delay", LOG_INTERVAL_S)
    kwargs.setdefault("leave", True)  # once shown, its last count is kept
    kwargs.setdefault("ncols", 100)
    return tqdm(iterable, file=_Lines(sys.stderr), **kwargs)
