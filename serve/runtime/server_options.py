"""What one tritonserver is started with (:class:`ServerOptions`) and the command line
built from them (:func:`server_command`).

Defaults that protect a deployment: every port binds loopback unless ``host`` says
otherwise; the control-plane APIs are restricted behind an admin key (``serve/core/auth.py``),
and binding a non-loopback address without that restriction is refused; tritonserver
runs with jemalloc (``LD_PRELOAD``, as NVIDIA's containers do) when ``libjemalloc.so.2``
is installed, which returns freed memory instead of letting glibc's arenas keep it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from serve.backend.errors import UsageError
from serve.core import auth
from serve.runtime.install import TritonInstall, find_jemalloc

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def client_host(host: str) -> str:
    """The address clients on this machine reach a server bound to ``host`` at
    (loopback for a wildcard bind)."""
    return LOOPBACK if host in ("0.0.0.0", "::", "") else host


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
        host = client_host(self.host)
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
