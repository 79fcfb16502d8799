"""The admin key that guards the server's control plane (torch-free).

``serve run`` starts tritonserver with Triton's own ``--http-restricted-api`` /
``--grpc-restricted-protocol`` for every API that is not inference, health, metadata or
model config (:data:`RESTRICTED`): loading/unloading models (which, with file overrides,
runs arbitrary Python in the python backend), registering shared memory, statistics,
tracing and logging settings. Those calls must carry the header ``admin-key: <key>``.

The key is the user's (``$TRAINSERVE_ADMIN_KEY`` or ``--admin-key-file``) or generated
at start (``secrets.token_urlsafe``), and written, readable by the owner only (0600),
to one file per port of the server under ``~/.cache/trainserve/admin-keys/`` (or
``$TRAINSERVE_KEY_DIR``), where this project's clients on the same machine find it by
the URL they talk to. The files are removed when the server stops.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from serve.backend.errors import UserError

HEADER = "admin-key"
ENV_KEY = "TRAINSERVE_ADMIN_KEY"
ENV_DIR = "TRAINSERVE_KEY_DIR"
RESTRICTED = ("model-repository", "shared-memory", "statistics", "trace", "logging")
OPEN = ("health", "metadata", "inference", "model-config")


class AdminKeyError(UserError, PermissionError):
    """A key file that is missing, unreadable or readable by others."""


def key_dir() -> Path:
    """Where ``serve run`` puts its key files."""
    env = os.environ.get(ENV_DIR, "")
    return Path(env) if env else Path.home() / ".cache" / "trainserve" / "admin-keys"


def key_path(url: str) -> Path:
    """The key file of the server at ``url`` (HOST:PORT)."""
    host, _, port = url.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host in ("localhost", "0.0.0.0", "::", "::1"):
        host = "127.0.0.1"
    return key_dir() / f"{host}_{port}"


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def write_key_file(path: Path, key: str) -> Path:
    """Write ``key`` to ``path`` with mode 0600 (created so, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_key_file(path: Path) -> str:
    """The key in ``path``; refuses a file that group or others can read."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise AdminKeyError(f"admin key file {path} cannot be read: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AdminKeyError(
            f"admin key file {path} is readable by others (mode {oct(mode & 0o777)}); "
            f"`chmod 600 {path}`"
        )
    key = path.read_text().strip()
    if not key:
        raise AdminKeyError(f"admin key file {path} is empty")
    return key


def resolve_key(url: str | None, key_file: str | None = None) -> str | None:
    """The key a client sends to ``url``: ``key_file``, else ``$TRAINSERVE_ADMIN_KEY``,
    else the file ``serve run`` wrote for that port; None when there is none."""
    if key_file:
        return read_key_file(Path(key_file))
    if os.environ.get(ENV_KEY, "").strip():
        return os.environ[ENV_KEY].strip()
    if url:
        path = key_path(url)
        if path.exists():
            return read_key_file(path)
    return None


GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"  # the name Triton 2.51 checks over gRPC


def headers(key: str | None) -> dict[str, str] | None:
    """The request headers that carry ``key`` (None without a key): ``admin-key`` for
    HTTP and ``triton-grpc-protocol-admin-key`` for gRPC (measured on Triton 2.51: its gRPC
    frontend checks the restricted-protocol header under that prefixed name). Both are
    sent, so one dict serves either protocol."""
    return {HEADER: key, GRPC_HEADER: key} if key else None


def server_flags(key: str) -> list[str]:
    """tritonserver flags restricting :data:`RESTRICTED` behind ``admin-key: key``."""
    apis = ",".join(RESTRICTED)
    return [
        f"--http-restricted-api={apis}:{HEADER}={key}",
        f"--grpc-restricted-protocol={apis}:{HEADER}={key}",
    ]


def shm_dir_file(url: str) -> Path:
    """Where ``serve run`` says which /dev/shm the server at ``url`` uses."""
    return key_path(url).with_name(key_path(url).name + ".shm")


def write_shm_dir_file(url: str, folder: str) -> Path:
    """Record ``folder`` (a server's private /dev/shm, as this user reaches it), 0600."""
    return write_key_file(shm_dir_file(url), folder)


def shm_dir(url: str | None) -> str | None:
    """The private /dev/shm of the server at ``url`` (None: the machine's /dev/shm)."""
    if not url:
        return None
    path = shm_dir_file(url)
    try:
        folder = path.read_text().strip()
    except OSError:
        return None
    return folder if folder and Path(folder).is_dir() else None


def metrics_url_file(url: str) -> Path:
    """Where ``serve run`` records the metrics URL of the server at ``url``."""
    return key_path(url).with_name(key_path(url).name + ".metrics")


def metrics_url(url: str | None, default_port: int = 8002) -> str | None:
    """The Prometheus URL of the server at ``url``: what ``serve run`` recorded for it;
    else, for a server on the default ports (8000/8001), ``default_port``; else None."""
    if not url:
        return f"http://127.0.0.1:{default_port}/metrics"
    try:
        return metrics_url_file(url).read_text().strip() or None
    except OSError:
        pass
    host, _, port = url.rpartition(":")
    return f"http://{host}:{default_port}/metrics" if port in ("8000", "8001") else None


def http_url_file(url: str) -> Path:
    """Where ``serve run`` records the HTTP address of the server whose gRPC is ``url``
    (its replicas' control is an HTTP route)."""
    return key_path(url).with_name(key_path(url).name + ".http")


def http_url(url: str | None) -> str | None:
    """The HTTP ``HOST:PORT`` of the server at ``url``: ``url`` itself when it is one,
    what ``serve run`` recorded for it, or None."""
    if not url:
        return "127.0.0.1:8000"
    try:
        return http_url_file(url).read_text().strip() or None
    except OSError:
        return None


def remove_key_files(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
