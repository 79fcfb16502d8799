"""Start the ``tritonserver`` binary shipped in the nvidia-pytriton wheel.

Everything is derived at run time from the running interpreter: the wheel's
location (site-packages), the python-backend stub for this Python version, the
interpreter's LIBDIR (for libpython) and the venv's ``bin`` (the stub's Python
finds packages through the first ``python3`` on PATH).

Defaults that protect a deployment: every port binds loopback unless ``host`` says
otherwise; the control-plane APIs are restricted behind an admin key (``serve/core/auth.py``),
and binding a non-loopback address without that restriction is refused; tritonserver
runs with jemalloc (``LD_PRELOAD``, as NVIDIA's containers do) when ``libjemalloc.so.2``
is installed, which returns freed memory instead of letting glibc's arenas keep it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.core import auth
from serve.core.errors import SetupError, UsageError, UserError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
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


@dataclass
class ServerOptions:
    """Command-line options of one server."""

    model_repository: str = "model_repository"
    host: str = LOOPBACK
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control: str = "explicit"
    load_models: list[str] = field(default_factory=lambda: ["*"])
    exit_timeout: int = 10
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    restricted: bool = True  # control-plane APIs need the admin key
    admin_key: str = ""  # "" -> $TRAINSERVE_ADMIN_KEY, else a new random key
    jemalloc: bool | None = None  # None: preload it when installed

    def __post_init__(self) -> None:
        if not self.restricted and self.host not in LOOPBACK_HOSTS:
            raise UsageError(
                f"refusing to bind {self.host} with unrestricted control APIs: anyone who "
                "reaches the port could load models (arbitrary code) - keep the admin key "
                "restriction on, or bind 127.0.0.1"
            )
        if self.restricted and not self.admin_key:
            self.admin_key = os.environ.get(auth.ENV_KEY, "").strip() or auth.new_key()

    @property
    def urls(self) -> list[str]:
        """HOST:PORT of the HTTP and gRPC endpoints, as clients on this machine reach them."""
        host = LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host
        return [f"{host}:{self.http_port}", f"{host}:{self.grpc_port}"]

    def jemalloc_path(self) -> str | None:
        if self.jemalloc is False:
            return None
        path = find_jemalloc()
        if self.jemalloc and path is None:
            raise FileNotFoundError(
                "jemalloc requested but libjemalloc.so.2 is not installed "
                "(apt-get install libjemalloc2)"
            )
        return path

    def write_key_files(self) -> list[Path]:
        """The admin key, mode 0600, where clients on this machine look for it."""
        if not self.restricted:
            return []
        return [auth.write_key_file(auth.key_path(u), self.admin_key) for u in self.urls]


def server_command(install: TritonInstall, opts: ServerOptions) -> list[str]:
    """The tritonserver argv for ``opts``."""
    repo = Path(opts.model_repository)
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} does not exist (run `make export`)")
    cmd = [
        str(install.binary),
        f"--model-repository={repo.resolve()}",
        f"--backend-directory={install.backend_directory()}",
        f"--http-address={opts.host}",
        f"--http-port={opts.http_port}",
        f"--grpc-address={opts.host}",
        f"--grpc-port={opts.grpc_port}",
        f"--metrics-address={opts.host}",
        f"--metrics-port={opts.metrics_port}",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        f"--exit-timeout-secs={opts.exit_timeout}",
        "--disable-auto-complete-config",
        f"--log-verbose={opts.log_verbose}",
        f"--model-control-mode={opts.model_control}",
    ]
    if opts.model_control == "explicit":
        cmd += [f"--load-model={m}" for m in opts.load_models]
    if opts.restricted:
        cmd += auth.server_flags(opts.admin_key)
    return cmd + list(opts.extra_args)


def exec_server(opts: ServerOptions) -> None:
    """Replace this process with tritonserver (foreground; SIGTERM/Ctrl-C stop it cleanly)."""
    install = TritonInstall.find()
    cmd = server_command(install, opts)
    log.info("%s", describe(opts))
    opts.write_key_files()  # left behind by exec: the next start overwrites them
    os.execve(cmd[0], cmd, install.environment(jemalloc=opts.jemalloc_path()))


def describe(opts: ServerOptions, watchdog: float = 0.0) -> str:
    """One line saying what a server listens on and how it is protected."""
    key = (
        "control APIs need the admin key (files: "
        + ", ".join(str(auth.key_path(u)) for u in opts.urls)
        + ")"
        if opts.restricted
        else "control APIs UNRESTRICTED (loopback only)"
    )
    return (
        f"tritonserver: HTTP {opts.host}:{opts.http_port}, gRPC {opts.host}:{opts.grpc_port}, "
        f"metrics {opts.host}:{opts.metrics_port}, repository {opts.model_repository}; {key}; "
        f"jemalloc {'on' if opts.jemalloc_path() else 'off'}"
        + (f"; stub watchdog every {watchdog:g} s" if watchdog else "")
    )


def run_supervised(opts: ServerOptions, watchdog_interval: float, server: Any = None) -> int:
    """``serve run``: the server as a child (its log on our stdout) plus, when
    ``watchdog_interval`` > 0, the stub watchdog (serve/runtime/watchdog.py). ``server`` is a
    :class:`TritonServer` (the default) or a :class:`serve.runtime.stack.PublicServer` (the front).
    SIGTERM/SIGINT stop the server cleanly; returns the server's exit code."""
    from serve.runtime.watchdog import WatchdogConfig, watch

    server = server or TritonServer(opts, inherit_output=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("%s", describe(opts, watchdog_interval))
    try:
        server.start(timeout=600)
    except RuntimeError:
        if not stop.is_set():
            raise
        return server.stop() or 0  # stopped by a signal while loading models
    watcher = None
    if watchdog_interval > 0:
        cfg = WatchdogConfig(
            url=server.local_grpc_url,
            interval=watchdog_interval,
            admin_key=opts.admin_key or None,
        )
        watcher = threading.Thread(target=watch, args=(cfg, stop), daemon=True)
        watcher.start()
    assert server.process is not None
    while not stop.is_set() and server.process.poll() is None:
        stop.wait(0.5)
    stop.set()
    code = server.stop(timeout=max(30.0, opts.exit_timeout + 10.0))
    if watcher is not None:
        watcher.join(timeout=5)
    return code if code is not None else 0


def http_status(url: str, timeout: float = 2.0) -> int:
    """The HTTP status of GET ``url`` (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def log_tail(path: Path | None, lines: int = 30) -> str:
    """The last ``lines`` of a server log, for error messages ("" without one)."""
    if not path or not path.is_file():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- server log ---\n" + "\n".join(tail)


def free_port(host: str = LOOPBACK) -> int:
    """A currently free TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver child process (for tests, benchmarks and tools).

    ``with TritonServer(ServerOptions(...)) as server:`` starts it, waits until it
    is ready, and stops it by PID on exit (SIGTERM, then SIGKILL after a timeout).
    """

    def __init__(
        self,
        opts: ServerOptions,
        log_path: str | Path | None = None,
        inherit_output: bool = False,
    ) -> None:
        self.opts = opts
        self.log_path = Path(log_path) if log_path else None
        self.inherit_output = inherit_output  # server log on our stdout (``serve run``)
        self.process: subprocess.Popen | None = None
        self._log = None
        self._key_files: list[Path] = []

    @property
    def admin_key(self) -> str | None:
        """The key of the restricted APIs (None when unrestricted)."""
        return self.opts.admin_key if self.opts.restricted else None

    @property
    def http_url(self) -> str:
        return f"{self.opts.host}:{self.opts.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.opts.host}:{self.opts.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.opts.host}:{self.opts.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Start the server and wait until it is ready; a no-op while it already runs
        (so ``with TritonServer(opts).start() as srv:`` starts one server, not two)."""
        if self.process is not None and self.process.poll() is None:
            return self
        install = TritonInstall.find()
        cmd = server_command(install, self.opts)
        out = None if self.inherit_output else subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("wb")
            out = self._log
        self._key_files = self.opts.write_key_files() + [
            auth.write_key_file(auth.metrics_url_file(u), self.metrics_url) for u in self.opts.urls
        ]
        self.process = subprocess.Popen(
            cmd,
            env=install.environment(jemalloc=self.opts.jemalloc_path()),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started server (or its key files) behind
            raise
        return self

    @property
    def local_grpc_url(self) -> str:
        """gRPC address to reach the server from this machine (loopback if bound to all)."""
        host = LOOPBACK if self.opts.host in ("0.0.0.0", "::", "") else self.opts.host
        return f"{host}:{self.opts.grpc_port}"

    def _get(self, path: str) -> int:
        return http_status(f"http://{self.http_url}{path}")

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the server reports ready; raise with the log tail if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SetupError(
                    f"tritonserver exited with {self.process.returncode}{self._log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM by PID, wait, SIGKILL the process group if it does not exit."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self._log:
            self._log.close()
            self._log = None
        auth.remove_key_files(self._key_files)
        self._key_files = []
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
