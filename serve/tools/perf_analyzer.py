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

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from serve.core.cli_common import tool_main
from serve.core.errors import SetupError, UsageError, UserError
from serve.core.files import atomic_write_text

log = logging.getLogger(__name__)

VERSION = "2.51.0"
WHEEL_SPEC = f"tritonclient=={VERSION}"
WHEEL_FILE = f"tritonclient-{VERSION}-py3-none-manylinux1_x86_64.whl"
WHEEL_SHA256 = "c485bb0123bdf310f90bc8b03d3489b28df2ffed55b30c7eee0b795b48113d52"
WHEEL_MEMBER = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
# The shared libraries the binary needs beyond glibc/libstdc++, and where each comes from.
NEEDS = {
    "libb64.so.0d": "Debian package libb64-0d (as root: apt-get install -y libb64-0d)",
    "libcudart.so.12": "PyPI nvidia-cuda-runtime-cu12 (in requirements.lock: make setup)",
}
US_PER_MS = 1000.0


class PerfAnalyzerError(UserError, RuntimeError):
    """perf_analyzer is missing, cannot load, or a run failed."""


class Unstable(PerfAnalyzerError):
    """perf_analyzer found no stable measurement (it then writes no report)."""


# ----------------------------------------------------------------------------- install


def _bin_dir(prefix: Path) -> Path:
    return prefix / "bin"


def cudart_dir(prefix: Path | None = None) -> Path:
    """``nvidia/cuda_runtime/lib`` of the venv at ``prefix`` (default: this one)."""
    if prefix is None or Path(prefix).resolve() == Path(sys.prefix).resolve():
        site = Path(sysconfig.get_paths()["purelib"])
    else:
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = Path(prefix) / "lib" / py / "site-packages"
    return site / "nvidia" / "cuda_runtime" / "lib"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The tritonclient 2.51.0 wheel in ``cache`` (downloaded with pip when missing),
    verified against :data:`WHEEL_SHA256`."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--only-binary=:all:", "--dest", str(cache), WHEEL_SPEC]
        subprocess.run(cmd, check=True)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise PerfAnalyzerError(f"{WHEEL_FILE}: sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def wrapper_script(prefix: Path) -> str:
    """The ``bin/perf_analyzer`` shell wrapper (paths relative to the venv)."""
    cudart = os.path.relpath(cudart_dir(prefix), _bin_dir(prefix))
    return (
        "#!/bin/sh\n"
        f"# perf_analyzer {VERSION} from the tritonclient wheel (serve/tools/perf_analyzer.py);\n"
        "# libcudart.so.12 (nvidia-cuda-runtime-cu12) only has to be loadable.\n"
        'here=$(dirname "$(readlink -f "$0")")\n'
        f'LD_LIBRARY_PATH="$here/{cudart}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
        f'exec "$here/../libexec/perf_analyzer" "$@"\n'
    )


def install(prefix: Path, cache: Path) -> Path:
    """Put the binary into ``<prefix>/libexec`` and the wrapper into ``<prefix>/bin``;
    returns the wrapper's path."""
    if not (cudart_dir(prefix) / "libcudart.so.12").is_file():
        raise PerfAnalyzerError(
            f"libcudart.so.12 missing under {cudart_dir(prefix)}: {NEEDS['libcudart.so.12']}"
        )
    wheel = fetch_wheel(cache)
    libexec = prefix / "libexec"
    libexec.mkdir(parents=True, exist_ok=True)
    target = libexec / "perf_analyzer"
    tmp = libexec / f".perf_analyzer.{os.getpid()}"
    with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.chmod(0o755)
    os.replace(tmp, target)
    wrapper = _bin_dir(prefix) / "perf_analyzer"
    atomic_write_text(wrapper, wrapper_script(prefix))
    wrapper.chmod(0o755)
    return wrapper


def missing_libraries(binary: Path) -> list[str]:
    """Libraries ``ldd`` cannot resolve for ``binary`` (with the wrapper's library path)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(cudart_dir()), env.get("LD_LIBRARY_PATH", "")) if p
    )
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, env=env, check=False
    ).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


# ----------------------------------------------------------------------------- locate


def find_binary() -> Path:
    """The perf_analyzer wrapper of this venv, else the first on PATH."""
    local = Path(sys.executable).parent / "perf_analyzer"
    if local.is_file():
        return local
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise PerfAnalyzerError("perf_analyzer not found: run `make setup`")


def version(binary: Path | None = None) -> str:
    """perf_analyzer's version (``--version``); explains a binary that cannot load."""
    binary = binary or find_binary()
    r = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    m = re.search(r"Perf Analyzer Version (\S+)", r.stdout + r.stderr)
    if r.returncode == 0 and m:
        return m.group(1)
    real = binary.parent.parent / "libexec" / "perf_analyzer"
    missing = missing_libraries(real if real.is_file() else binary)
    hint = "; ".join(f"{lib}: {NEEDS.get(lib, '?')}" for lib in missing)
    raise PerfAnalyzerError(
        f"{binary} --version failed (exit {r.returncode}): "
        f"{(r.stderr or r.stdout).strip()[-400:]}" + (f"; missing {hint}" if hint else "")
    )


# ----------------------------------------------------------------------------- run


@dataclass
class Profile:
    """One perf_analyzer invocation: a single load level against one model."""

    model: str
    url: str  # HOST:PORT of the protocol's endpoint
    protocol: str = "grpc"  # grpc | http
    batch: int = 1
    concurrency: int = 0  # closed loop with this many outstanding requests, or
    request_rate: float = 0.0  # open loop at this many requests/s
    distribution: str = "poisson"  # request-rate arrivals: poisson | constant
    shared_memory: str = "none"  # none | system
    input_data: str = ""  # JSON file (real images); "" -> perf_analyzer's random data
    measurement_interval_ms: int = 1000
    measurement_mode: str = "time_windows"  # time_windows | count_windows
    measurement_request_count: int = 50  # count_windows only
    stability_percentage: float = 10.0
    max_trials: int = 10
    headers: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.request_rate > 0):
            raise UsageError("give exactly one of concurrency and request_rate")
        if self.protocol not in ("grpc", "http"):
            raise UsageError(f"protocol must be grpc or http, got {self.protocol!r}")

    def window_ms(self) -> int:
        """The measurement window; a request-rate run's holds about
        :data:`MIN_REQUESTS_PER_WINDOW` requests at least."""
        if not self.request_rate:
            return self.measurement_interval_ms
        needed = math.ceil(MIN_REQUESTS_PER_WINDOW / self.request_rate * 1000)
        return max(self.measurement_interval_ms, needed)

    def command(self, binary: Path, csv_path: Path) -> list[str]:
        """perf_analyzer's argv for this profile, its CSV report going to ``csv_path``."""
        cmd = [
            str(binary),
            "-m",
            self.model,
            "-u",
            self.url,
            "-i",
            self.protocol,
            "-b",
            str(self.batch),
            f"--measurement-mode={self.measurement_mode}",
            f"--measurement-interval={self.window_ms()}",
            f"--stability-percentage={self.stability_percentage:g}",
            f"--max-trials={self.max_trials}",
            f"--shared-memory={self.shared_memory}",
            "-f",
            str(csv_path),
        ]
        if self.measurement_mode == "count_windows":
            cmd.append(f"--measurement-request-count={self.measurement_request_count}")
        if self.concurrency:
            cmd.append(f"--concurrency-range={self.concurrency}:{self.concurrency}")
        else:
            rate = f"{self.request_rate:g}"
            cmd.append(f"--request-rate-range={rate}:{rate}")
            cmd.append(f"--request-distribution={self.distribution}")
        if self.input_data:
            cmd.append(f"--input-data={self.input_data}")
        for k, v in self.headers.items():
            cmd += ["-H", f"{k}:{v}"]
        return cmd + list(self.extra)


@dataclass
class Row:
    """One line of perf_analyzer's CSV report, latencies in ms."""

    concurrency: int
    request_rate: float | None
    throughput: float  # inferences (images)/s
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    server_queue_ms: float
    server_compute_ms: float  # input + infer + output
    client_send_ms: float
    client_recv_ms: float


def _ms(row: dict[str, str], key: str) -> float:
    value = row.get(key, "")
    return float(value) / US_PER_MS if value not in ("", None) else 0.0


def parse_csv(path: Path) -> list[Row]:
    """The rows of a ``-f`` CSV report (latencies there are in microseconds)."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if any(v for v in r.values())]
    if not rows:
        raise PerfAnalyzerError(f"{path}: no rows")
    out = []
    for r in rows:
        if "Inferences/Second" not in r or "p99 latency" not in r:
            raise PerfAnalyzerError(f"{path}: unexpected columns {sorted(r)}")
        rate = r.get("Request Rate")
        out.append(
            Row(
                concurrency=int(float(r.get("Concurrency") or 0)),
                request_rate=float(rate) if rate else None,
                throughput=float(r["Inferences/Second"]),
                p50_ms=_ms(r, "p50 latency"),
                p90_ms=_ms(r, "p90 latency"),
                p95_ms=_ms(r, "p95 latency"),
                p99_ms=_ms(r, "p99 latency"),
                avg_ms=_ms(r, "Avg latency"),
                server_queue_ms=_ms(r, "Server Queue"),
                server_compute_ms=_ms(r, "Server Compute Input")
                + _ms(r, "Server Compute Infer")
                + _ms(r, "Server Compute Output"),
                client_send_ms=_ms(r, "Client Send"),
                client_recv_ms=_ms(r, "Client Recv"),
            )
        )
    return out


@dataclass
class Result:
    """A finished perf_analyzer run: its rows, whether it found a stable measurement,
    and its output (for the log)."""

    rows: list[Row]
    stable: bool
    output: str
    command: list[str]


UNSTABLE = "Failed to obtain stable measurement"
EMPTY_WINDOW = "No valid requests recorded within time interval"
RELAXED_STABILITY = 10_000.0  # %: any 3 windows pass
MIN_REQUESTS_PER_WINDOW = 10  # request-rate runs: windows long enough for this many


def input_data_json(name: str, samples: list[bytes], shape: list[int] | None = None) -> dict:
    """perf_analyzer's ``--input-data`` JSON: one step per sample of input ``name``, each
    the sample's bytes in base64 (an FP32 tensor's raw little-endian bytes, or the 4-byte
    length-prefixed element of a BYTES tensor, see :func:`bytes_element`)."""
    steps = []
    for raw in samples:
        tensor: dict[str, object] = {"b64": base64.b64encode(raw).decode("ascii")}
        if shape is not None:
            tensor["shape"] = list(shape)
        steps.append({name: tensor})
    return {"data": steps}


def bytes_element(data: bytes) -> bytes:
    """One element of a Triton BYTES tensor as serialized on the wire (length prefix)."""
    return struct.pack("<I", len(data)) + data


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


def mount_namespace_prefix(profile: Profile) -> list[str]:
    """``serve run``'s Triton keeps a private /dev/shm (its own mount namespace), where
    perf_analyzer's ``--shared-memory system`` regions must be made: then perf_analyzer
    runs in that mount namespace (``nsenter``; the network stays ours, so it still talks
    to the public front). Empty for any other server."""
    if profile.shared_memory != "system":
        return []
    from serve.core import auth

    folder = auth.shm_dir(profile.url)
    match = re.fullmatch(r"/proc/(\d+)/root/dev/shm", folder or "")
    if not match:
        return []
    nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
    user = [] if os.geteuid() == 0 else ["--user", "--preserve-credentials"]
    return [nsenter, f"--target={match.group(1)}", *user, "--mount", "--"]


def _run_once(profile: Profile, csv_path: Path, timeout: float) -> Result | None:
    """One perf_analyzer process; None when it found no stable measurement."""
    binary = find_binary()
    cmd = mount_namespace_prefix(profile) + profile.command(binary, csv_path)
    csv_path.unlink(missing_ok=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise PerfAnalyzerError(f"perf_analyzer ran over {timeout:g} s: {_shown(cmd)}") from e
    output = r.stdout + r.stderr
    if r.returncode != 0 and (UNSTABLE in output or EMPTY_WINDOW in output):
        return None
    if r.returncode != 0 or not csv_path.is_file():
        tail = "\n".join(output.strip().splitlines()[-8:])
        raise PerfAnalyzerError(f"exit {r.returncode}: {_shown(cmd)}\n{tail}")
    return Result(parse_csv(csv_path), True, output, cmd)


def _shown(cmd: list[str]) -> str:
    """The command line with header values (the admin key) masked."""
    out, mask = [], False
    for a in cmd:
        out.append(a.split(":", 1)[0] + ":***" if mask else a)
        mask = a == "-H"
    return " ".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m serve perf-analyzer``."""
    p.add_argument("action", choices=["install", "check"])
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
            path = _bin_dir(prefix) / "perf_analyzer"
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
