"""The front alone before a running loopback tritonserver (``make bench``, ``make tune``):
the same Triton measured through the front and directly in one run."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from serve.core.errors import SetupError
from serve.runtime.front import find_haproxy, render
from serve.runtime.handle import ServerHandle, free_port
from serve.runtime.limits import FrontLimits, front_options, repository_models
from serve.runtime.server_options import LOOPBACK
from serve.runtime.stack import listen_socket, write_private

log = logging.getLogger(__name__)


class FrontOnly(ServerHandle):
    """The front alone (in this namespace) before a running loopback tritonserver - for
    ``make bench``, which measures the same Triton through the front and directly in one
    run, so the front's cost is a ratio. Same URL interface as :class:`PublicServer`."""

    def __init__(
        self, triton: Any, limits: FrontLimits | None = None, log_path: str | Path | None = None
    ) -> None:
        opts = replace(
            triton.opts, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
        )
        super().__init__(opts, log_path)
        self.triton = triton
        self.limits = limits or FrontLimits()

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
        self._spawn([haproxy, "-W", "-db", "-f", str(cfg)], pass_fds=tuple(fds))
        try:
            self._wait_ready(timeout, "the front", "the front")
        except (SetupError, TimeoutError):
            self.stop()
            raise SetupError(f"the front did not start (see {self.log_path})") from None
        return self

    def stop(self) -> None:
        self._stop(10.0)
