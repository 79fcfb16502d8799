"""What the server handles share (:class:`ServerHandle`): :class:`TritonServer`
(serve/runtime/triton_server.py) and :class:`PublicServer` (serve/runtime/stack.py) each
run one child process tree on the ports of their ``opts``; this is their URLs, readiness,
output, key files and stop."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, TypeVar

from serve.core import auth
from serve.core.errors import SetupError
from serve.runtime.server_options import LOOPBACK, ServerOptions, client_host

H = TypeVar("H", bound="ServerHandle")


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


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_rng = random.SystemRandom()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections and ``bind(port 0)``."""
    try:
        low, high = (int(v) for v in _EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` now and stays free until a server binds it.

    A port from the kernel's ephemeral range (what ``bind(port 0)`` returns) can be taken
    by any outgoing connection or other ``bind(0)`` in the moments before our server
    binds it ("address already in use"). This picks at random below that range, where
    the kernel never hands ports out by itself, checks that the port binds, and never
    returns the same port twice in one process.
    """
    low, _high = _ephemeral_range()
    floor = 10000
    if low - floor >= 1000:
        for _ in range(200):
            port = _rng.randrange(floor, low)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    for _ in range(50):  # the ephemeral range is all there is: ask the kernel
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise SetupError(f"no free TCP port on {host}")


class ServerHandle(ABC):
    """A server child process (in a session of its own) on the ports of ``opts``.

    ``with handle:`` starts it and stops it on exit. What a handle holds goes on stop:
    the process (SIGTERM, then SIGKILL of its process group after a timeout), its log
    file, its key files, the listening sockets it passed on and its private folder.
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
        self._log: IO[bytes] | None = None
        self._key_files: list[Path] = []
        self._sockets: list[socket.socket] = []
        self._workdir: Path | None = None

    @abstractmethod
    def start(self: H) -> H:
        """Start the server and wait until it is ready."""

    @abstractmethod
    def stop(self) -> int | None:
        """Stop the server and release what it holds; its exit code where it has one."""

    def __enter__(self: H) -> H:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- URLs ----------------------------------------------------------------------------
    @property
    def admin_key(self) -> str | None:
        return self.opts.admin_key or None

    @property
    def _client_host(self) -> str:
        return client_host(self.opts.host)

    @property
    def _url_host(self) -> str:
        """The host :attr:`http_url`, :attr:`grpc_url` and :attr:`metrics_url` name."""
        return self._client_host

    @property
    def http_url(self) -> str:
        return f"{self._url_host}:{self.opts.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._url_host}:{self.opts.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._url_host}:{self.opts.metrics_port}/metrics"

    @property
    def local_grpc_url(self) -> str:
        """gRPC address to reach the server from this machine (loopback if bound to all)."""
        return f"{self._client_host}:{self.opts.grpc_port}"

    # -- readiness -----------------------------------------------------------------------
    def _get(self, path: str) -> int:
        return http_status(f"http://{self.http_url}{path}")

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def _answers_ready(self) -> bool:
        """Whether the server answers ready, as :meth:`_wait_ready` asks it."""
        return self.is_ready()

    def _wait_ready(self, timeout: float, exited: str, late: str, stop_late: bool = False) -> None:
        """Block until the server answers ready; a SetupError ("``exited`` exited with")
        if the process ends, a TimeoutError ("``late`` not ready after") at the deadline
        (after :meth:`stop` with ``stop_late``), both with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SetupError(
                    f"{exited} exited with {self.process.returncode}{self._log_tail()}"
                )
            if self._answers_ready():
                return
            time.sleep(0.2)
        if stop_late:
            self.stop()
        raise TimeoutError(f"{late} not ready after {timeout:.0f}s{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    # -- lifecycle -----------------------------------------------------------------------
    def _running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _write_key_files(self) -> None:
        """The admin key, the metrics URL and the HTTP address, mode 0600, where local
        clients look."""
        self._key_files = self.opts.write_key_files()
        for u in self.opts.urls:
            self._key_files += [
                auth.write_key_file(auth.metrics_url_file(u), self.metrics_url),
                auth.write_key_file(auth.http_url_file(u), self.http_url),
            ]

    def _spawn(self, cmd: list[str], **popen: Any) -> None:
        """Start ``cmd`` in a session of its own, its output to ``log_path``, to our
        stdout (``inherit_output``) or nowhere."""
        out: Any = None if self.inherit_output else subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("wb")
            out = self._log
        self.process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )

    def _stop(self, timeout: float) -> int | None:
        """SIGTERM by PID, wait ``timeout``, SIGKILL the process group if it does not
        exit; then the log, key files, sockets and private folder go. The exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(10)
            code = self.process.returncode
        for s in self._sockets:
            s.close()
        self._sockets = []
        auth.remove_key_files(self._key_files)
        self._key_files = []
        if self._log:
            self._log.close()
            self._log = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code
