"""What the Makefile and the README promise a user before any work starts: MODEL is named
cheaply and once, every flag and make variable the README and docs/ name exists, bad
choices are one clear line."""

from __future__ import annotations

import argparse
import os
import re
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
    assert calls == ["-m train.config antsbees_probe model_name"]
    resolve = ["-m", "train.config", "antsbees_probe", "model_name"]
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
    # of serve only the error family (its root in serve.backend) and the lazy face of
    # serve.core (the standard library alone), no serving or decoding code
    assert "torch" not in imported and not {m for m in imported if m.startswith("serve.")} - {
        "serve.backend",
        "serve.backend.errors",
        "serve.core",
        "serve.core.exports",
        "serve.core.errors",
    }


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found |= {o for o in action.option_strings if o.startswith("--")}
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


# Flags of other programs the README and docs/ name, with the program (never our CLIs' flags).
EXTERNAL_FLAGS = {
    "--backend-config": "tritonserver",
    "--allow-gpu-metrics": "tritonserver",
    "--pinned-memory-pool-byte-size": "tritonserver",
    "--disable-auto-complete-config": "tritonserver",
    "--http-restricted-api": "tritonserver",
    "--grpc-restricted-protocol": "tritonserver",
    "--input-data": "perf_analyzer",
    "--measurement-mode": "perf_analyzer",
    "--measurement-request-count": "perf_analyzer",
    "--no-deps": "pip",
    "--trt": "polygraphy run",
    "--onnxrt": "polygraphy run",
    "--trt-outputs": "polygraphy run",
    "--onnx-outputs": "polygraphy run",
    "--dry-run": "pip",
    "--nproc": "torchrun (--nproc_per_node)",
    "--net": "unshare",
    "--mount": "unshare",
    "--user": "unshare",
    "--map-root-user": "unshare",
}


def test_every_flag_and_make_variable_the_readme_names_exists() -> None:
    """A flag the README or a docs/ page tells a user to pass (e.g. the `--server-url` it
    once named for `make export`) is an option of one of our commands; a make variable is
    the Makefile's. The README links the pages, so they are read with it."""
    from export.cli import COMMANDS as EXPORT
    from export.tools.tune import add_arguments as tune_arguments
    from serve.cli import COMMANDS as SERVE
    from serve.core.cli_common import build_parser
    from train.cli import COMMANDS as TRAIN

    ours: set[str] = set()
    for commands in (TRAIN, EXPORT, SERVE):
        ours |= _option_strings(build_parser("x", "", commands))
    tune = argparse.ArgumentParser()
    tune_arguments(tune)
    ours |= _option_strings(tune)
    compare = subprocess.run(  # .ci/compare-main, the house-change check docs/testing.md gives
        [sys.executable, str(ROOT / ".ci" / "compare-main"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    ours |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", compare.stdout)) - {"--help"}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/*.md missing"
    readme = "\n".join(page.read_text() for page in pages)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", readme))
    assert not EXTERNAL_FLAGS.keys() & ours  # the list above names no flag of ours
    assert sorted(named - ours - EXTERNAL_FLAGS.keys()) == []
    makefile = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([A-Z][A-Z0-9_]*) *[?:]?=", makefile, re.M))
    defined |= set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", makefile))
    variables = set(re.findall(r"(?<![\w-])([A-Z][A-Z0-9_]{2,})=", readme))
    variables |= set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.M))
    # --set KEY=VALUE is a placeholder; TRITON_IMAGE is docker compose's (the GPU file)
    compose = (ROOT / "serve" / "deploy" / "docker-compose.gpu.yml").read_text()
    assert "TRITON_IMAGE" in compose
    assert sorted(variables - defined - {"KEY", "TRITON_IMAGE"}) == []


def test_user_runs_never_write_what_the_repository_tracks() -> None:
    """Every tool's default output folder (make's and the commands' own) is git-ignored:
    a user's run never rewrites the dated results the docs quote (bench/results/)."""
    import re
    import subprocess

    from export.tools.tune_config import TuneConfig
    from serve.tools.bench_config import BenchConfig
    from serve.tools.chaos import ChaosConfig
    from serve.tools.soak import SoakConfig

    outs = {BenchConfig().out, TuneConfig().out, SoakConfig().out, ChaosConfig().out}
    for source in ROOT.glob("*/**/*.py"):
        if ".venv" not in source.parts and "tests" not in source.parts:
            outs |= set(re.findall(r'default="(bench[^"]*)"', source.read_text()))
    outs |= set(re.findall(r"--out (bench\S*)", (ROOT / "Makefile").read_text()))
    assert len(outs) >= 2 and "bench/results" not in outs, outs
    for out in sorted(outs):
        probe = f"{out}/x-latest.json"
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
        assert ignored.returncode == 0, f"{probe} is not git-ignored"
    tracked = subprocess.run(
        ["git", "check-ignore", "-q", "bench/results/x.json"], cwd=ROOT
    ).returncode
    assert tracked == 1  # the committed results are not ignored
