"""What the Makefile and the README promise a user before any work starts: MODEL is named
cheaply and once, every flag and make variable the README names exists, bad choices are
one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def _logging_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A VENV whose python logs every call to ``calls.log`` and runs the real one."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (venv / ".setup-done").touch()
    return venv, log


def test_make_names_model_once_without_torch(tmp_path: Path) -> None:
    """`make train export` resolves MODEL from the recipe with one tiny Python call (YAML
    only, no torch and no training CLI), not once per use."""
    venv, log = _logging_venv(tmp_path)
    out = subprocess.run(
        ["make", "-n", "train", "export", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--model antsbees" in out and "--name antsbees" in out
    calls = log.read_text().splitlines()
    assert calls == ["-m train.config antsbees_finetune model_name"]
    resolve = ["-m", "train.config", "antsbees_finetune", "model_name"]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *resolve],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout == "antsbees\n"
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported and "serve" not in imported
