"""The front alone before a running loopback tritonserver (``make bench``, ``make tune``):
the same Triton measured through the front and directly in one run."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from serve.core.errors import SetupError
from serve.runtime.front import find_haproxy, render
from serve.runtime.limits import FrontLimits, front_options, repository_models
from serve.runtime.stack import PublicServer, listen_socket, write_private
from serve.runtime.triton_server import (
    LOOPBACK,
    free_port,
)

log = logging.getLogger(__name__)


class FrontOnly:
    """The front alone (in this namespace) before a running loopback tritonserver - for
    ``make bench``, which measures the same Triton through the front and directly in one
    run, so the front's cost is a ratio. Same URL interface as :class:`PublicServer`."""

    def __init__(
        self, triton: Any, limits: FrontLimits | None = None, log_path: str | Path | None = None
    ) -> None:
        self.triton = triton
        self.limits = limits or FrontLimits()
        self.log_path = Path(log_path) if log_path else None
        self.opts = replace(
            triton.opts, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
        )
        self.process: subprocess.Popen | None = None
        self._sockets: list[socket.socket] = []
        self._workdir: Path | None = None
        self._log = None

    http_url = PublicServer.http_url
    grpc_url = PublicServer.grpc_url
    metrics_url = PublicServer.metrics_url
    _client_host = PublicServer._client_host
    admin_key = PublicServer.admin_key
    _get = PublicServer._get
    is_ready = PublicServer.is_ready

    def start(self, timeout: float = 60.0) -> FrontOnly:
        haproxy = find_haproxy()
        models = repository_models(Path(self.opts.model_repository))
        self._sockets = [
            listen_socket(LOOPBACK, p)
            for p in (self.opts.http_port, self.opts.grpc_port, self.opts.metrics_port)
        ]
        self._workdir = Path(tempfile.mkdtemp(prefix="trainserve-front-"))
        fds = [s.fileno() for s in self._sockets]
        t = self.triton.opts
        front = front_options(
            self.limits,
            models,
            fds,
            (t.http_port, t.grpc_port, t.metrics_port),
            admin_key=t.admin_key if t.restricted else "",
        )
        cfg = write_private(self._workdir / "haproxy.cfg", render(front))
        out = subprocess.DEVNULL
        if self.log_path:
            self._log = self.log_path.open("wb")
            out = self._log
        self.process = subprocess.Popen(
            [haproxy, "-W", "-db", "-f", str(cfg)],
            pass_fds=tuple(fds),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SetupError(f"the front did not start (see {self.log_path})")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for s in self._sockets:
            s.close()
        self._sockets = []
        if self._log:
            self._log.close()
            self._log = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> FrontOnly:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
