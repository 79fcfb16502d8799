"""Triton's perf_analyzer: installed by ``make setup``, driven by ``make bench`` / ``make tune``
(torch-free).

Where the binary comes from (checked, see docs/benchmarks.md): the ``tritonclient`` 2.51.0
wheel on PyPI (the version of the bundled tritonserver) ships ``bin/perf_analyzer``;
newer tritonclient wheels depend on a ``perf-analyzer`` package that is only an empty
placeholder here. The project keeps its newer tritonclient library and takes only the
binary out of the 2.51.0 wheel (downloaded once with pip, checked against its sha256) into
``<venv>/libexec/``. It needs ``libb64.so.0d`` (Debian ``libb64-0d``) and
``libcudart.so.12`` (PyPI ``nvidia-cuda-runtime-cu12``, pinned in the lock; needed only to
load, it runs on CPU), so ``<venv>/bin/perf_analyzer`` is a small wrapper that puts the
latter on ``LD_LIBRARY_PATH``.

``python -m serve perf-analyzer install`` does the above and checks ``--version``;
``python -m serve perf-analyzer check`` only checks.
"""

# The binary (install, locate, version) is serve/tools/perf_analyzer_install.py, a run's
# profile, CSV rows and input data serve/tools/perf_analyzer_profile.py; every name
# still imports from here, this module runs them.

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from serve.core.cli_common import tool_main
from serve.core.errors import SetupError
from serve.tools.perf_analyzer_install import (
    PerfAnalyzerError,
    bin_dir,
    find_binary,
    install,
    version,
)
from serve.tools.perf_analyzer_profile import (
    Profile,
    Result,
    parse_csv,
)

log = logging.getLogger(__name__)


class Unstable(PerfAnalyzerError):
    """perf_analyzer found no stable measurement (it then writes no report)."""


UNSTABLE = "Failed to obtain stable measurement"
EMPTY_WINDOW = "No valid requests recorded within time interval"
RELAXED_STABILITY = 10_000.0  # %: any 3 windows pass


def run(profile: Profile, csv_path: Path, timeout: float = 300.0, relax: bool = True) -> Result:
    """Run one profile; raises :class:`PerfAnalyzerError` with perf_analyzer's own words
    when it fails (a failed request aborts a perf_analyzer run).

    perf_analyzer 2.51 writes no report at all when a level does not stabilize within
    ``max_trials`` windows (or that sees an empty window); with ``relax`` the level is
    measured again over 3 windows twice as long, accepted whatever they show, and the
    result says ``stable=False``."""
    result = _run_once(profile, csv_path, timeout)
    if result is None and relax:
        log.info(
            "%s: not stable within %d windows, measured again unchecked",
            profile.model,
            profile.max_trials,
        )
        loose = replace(
            profile,
            stability_percentage=RELAXED_STABILITY,
            max_trials=3,
            measurement_interval_ms=2 * profile.measurement_interval_ms,
        )
        result = _run_once(loose, csv_path, timeout)
        if result is not None:
            result.stable = False
    if result is None:
        raise Unstable(f"{profile.model}: no stable measurement, even with relaxed rules")
    return result


def namespace_prefix(profile: Profile) -> list[str]:
    """The ``nsenter`` that puts perf_analyzer where it must run: in the network and mount
    namespaces of ``profile.netns_pid`` (serve run's private Triton: its owner listeners
    need no key, so none is in perf_analyzer's argv, and its /dev/shm is where
    ``--shared-memory system`` regions must be made); else, for shared memory only, in
    the mount namespace of the server whose private /dev/shm the key folder names.
    Empty for any other server."""
    nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
    user = [] if os.geteuid() == 0 else ["--user", "--preserve-credentials"]
    if profile.netns_pid:
        return [nsenter, f"--target={profile.netns_pid}", *user, "--net", "--mount", "--"]
    if profile.shared_memory != "system":
        return []
    from serve.core import auth

    folder = auth.shm_dir(profile.url)
    match = re.fullmatch(r"/proc/(\d+)/root/dev/shm", folder or "")
    if not match:
        return []
    return [nsenter, f"--target={match.group(1)}", *user, "--mount", "--"]


def _run_once(profile: Profile, csv_path: Path, timeout: float) -> Result | None:
    """One perf_analyzer process; None when it found no stable measurement."""
    binary = find_binary()
    cmd = namespace_prefix(profile) + profile.command(binary, csv_path)
    csv_path.unlink(missing_ok=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise PerfAnalyzerError(f"perf_analyzer ran over {timeout:g} s: {' '.join(cmd)}") from e
    output = r.stdout + r.stderr
    if r.returncode != 0 and (UNSTABLE in output or EMPTY_WINDOW in output):
        return None
    if r.returncode != 0 or not csv_path.is_file():
        tail = "\n".join(output.strip().splitlines()[-8:])
        raise PerfAnalyzerError(f"exit {r.returncode}: {' '.join(cmd)}\n{tail}")
    return Result(parse_csv(csv_path), True, output, cmd)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m serve perf-analyzer``."""
    p.add_argument(
        "action",
        choices=["install", "check"],
        help="install: from the wheel into <prefix>; check: print its version and path",
    )
    p.add_argument("--prefix", default=sys.prefix, help="the venv (default: this one)")
    p.add_argument(
        "--cache",
        default="",
        help="where the wheel is kept (default: <prefix>/var/wheels)",
    )


def run_command(a: argparse.Namespace) -> int:
    """``python -m serve perf-analyzer install|check`` (``make setup`` installs)."""
    prefix = Path(a.prefix)
    try:
        if a.action == "install":
            path = install(prefix, Path(a.cache) if a.cache else prefix / "var" / "wheels")
        else:
            path = bin_dir(prefix) / "perf_analyzer"
    except subprocess.CalledProcessError as e:  # a failed pip (offline, no wheel)
        raise SetupError(f"perf_analyzer: {e}") from e
    print(f"perf_analyzer {version(path)}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.tools.perf_analyzer``: the old spelling of ``python -m serve
    perf-analyzer``."""
    return tool_main(
        "python -m serve.tools.perf_analyzer", __doc__, add_arguments, run_command, argv
    )


if __name__ == "__main__":
    sys.exit(main())
