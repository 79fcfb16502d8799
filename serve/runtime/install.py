"""Where the ``tritonserver`` of the nvidia-pytriton wheel lives (:class:`TritonInstall`)
and what it runs with: the python-backend stub for this Python version, the
interpreter's LIBDIR (for libpython), the venv's ``bin`` first on PATH (the stub's Python
finds packages through the first ``python3`` there) and jemalloc (:func:`find_jemalloc`)."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from serve.backend.errors import UserError

JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2 (Debian package libjemalloc2), or None."""
    env = os.environ.get("TRAINSERVE_JEMALLOC", "")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in JEMALLOC_PATHS if Path(p).is_file()), None)


class TritonNotFound(UserError, RuntimeError):
    """The nvidia-pytriton wheel (and its tritonserver) is not installed."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the installed nvidia-pytriton wheel."""

    root: Path  # .../site-packages/pytriton/tritonserver

    @classmethod
    def find(cls) -> TritonInstall:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonNotFound("nvidia-pytriton is not installed (run `make setup`)")
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        if not (root / "bin" / "tritonserver").is_file():
            raise TritonNotFound(f"no tritonserver binary under {root}")
        return cls(root)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def python_stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonNotFound(f"no python-backend stub for Python {version} at {stub}")
        return stub

    def backend_directory(self) -> Path:
        """A backend dir whose ``python/`` holds the backend library, utils and the stub
        for this interpreter (made once per venv, as symlinks into the wheel)."""
        base = Path(sys.prefix) / "var" / "triton-backends"
        if not os.access(Path(sys.prefix), os.W_OK):
            base = Path.home() / ".cache" / "trainserve" / "triton-backends"
        py = base / f"py{sys.version_info.major}{sys.version_info.minor}"
        target = py / "python"
        target.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": self.root / "backends" / "python" / "libtriton_python.so",
            "triton_python_backend_utils.py": self.root
            / "backends"
            / "python"
            / "triton_python_backend_utils.py",
            "triton_python_backend_stub": self.python_stub(),
        }
        for name, src in links.items():
            dst = target / name
            if dst.is_symlink() and dst.resolve() == src.resolve():
                continue
            tmp = target / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(src)
            os.replace(tmp, dst)
        return py

    def environment(
        self, base: dict[str, str] | None = None, jemalloc: str | None = None
    ) -> dict[str, str]:
        """Environment for the server: libpython + wheel libs, venv python first on PATH,
        ``jemalloc`` (a path) preloaded when given."""
        env = dict(os.environ if base is None else base)
        libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(self.libs)]
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if jemalloc:
            env["LD_PRELOAD"] = " ".join(p for p in (jemalloc, env.get("LD_PRELOAD", "")) if p)
        return env
