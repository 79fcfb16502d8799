"""Progress bars in a log (stderr not a terminal): no "0%" line for a short loop, whole
lines only (no carriage returns), the final count kept for a long one."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def _stderr_of(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return proc.stderr


def test_a_short_loop_writes_nothing_to_a_log() -> None:
    err = _stderr_of(
        "from train.run.progress import progress\nfor _ in progress(range(50), desc='x'): pass\n"
    )
    assert err == ""


def test_a_long_loop_writes_whole_lines_and_its_final_count() -> None:
    err = _stderr_of(
        "import time\n"
        "import train.run.progress as p\n"
        "p.LOG_INTERVAL_S = 0.05\n"
        "for _ in p.progress(range(6), desc='epoch 1/2 train'):\n"
        "    time.sleep(0.05)\n"
    )
    lines = err.splitlines()
    assert "\r" not in err and lines and all(line.startswith("epoch 1/2 train:") for line in lines)
    assert "6/6" in lines[-1] and not any(" 0%|" in line for line in lines)
