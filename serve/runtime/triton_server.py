"""Start the ``tritonserver`` binary shipped in the nvidia-pytriton wheel: in place of
this process (:func:`exec_server`), as ``serve run``'s supervised child
(:func:`run_supervised`) or as a handle for tests, benchmarks and tools
(:class:`TritonServer`).

Everything is derived at run time from the running interpreter (serve/runtime/install.py:
the wheel's location, the python-backend stub, libpython, the venv's ``bin``); the
options and their protective defaults (loopback, the admin key, jemalloc) are in
serve/runtime/server_options.py. The names of both are importable from here too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from serve.runtime.handle import ServerHandle
from serve.runtime.install import TritonInstall
from serve.runtime.server_options import (
    ServerOptions,
    describe,
    server_command,
)

__all__ = ["TritonServer", "exec_server", "run_supervised"]

log = logging.getLogger(__name__)


def exec_server(opts: ServerOptions) -> None:
    """Replace this process with tritonserver (foreground; SIGTERM/Ctrl-C stop it cleanly)."""
    install = TritonInstall.find()
    cmd = server_command(install, opts)
    log.info("%s", describe(opts))
    opts.write_key_files()  # left behind by exec: the next start overwrites them
    os.execve(cmd[0], cmd, install.environment(jemalloc=opts.jemalloc_path()))


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
    if hasattr(server, "check_ports"):  # a port in use: one error line, not the banner
        server.check_ports()
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


class TritonServer(ServerHandle):
    """A tritonserver child process (for tests, benchmarks and tools).

    ``with TritonServer(ServerOptions(...)) as server:`` starts it, waits until it
    is ready, and stops it by PID on exit (SIGTERM, then SIGKILL after a timeout).
    """

    @property
    def admin_key(self) -> str | None:
        """The key of the restricted APIs (None when unrestricted)."""
        return self.opts.admin_key if self.opts.restricted else None

    @property
    def _url_host(self) -> str:
        return self.opts.host  # as bound (``local_grpc_url``: as reached from here)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Start the server and wait until it is ready; a no-op while it already runs
        (so ``with TritonServer(opts).start() as srv:`` starts one server, not two)."""
        if self._running():
            return self
        install = TritonInstall.find()
        cmd = server_command(install, self.opts)
        self._write_key_files()
        try:
            self._spawn(cmd, env=install.environment(jemalloc=self.opts.jemalloc_path()))
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started server (or its key files) behind
            raise
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the server reports ready; raise with the log tail if it dies."""
        self._wait_ready(timeout, "tritonserver", "tritonserver", stop_late=True)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM by PID, wait, SIGKILL the process group if it does not exit."""
        return self._stop(timeout)
