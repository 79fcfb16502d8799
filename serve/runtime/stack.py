"""``serve run``'s server: the HAProxy front on the public ports, tritonserver private.

:class:`PublicServer` has the interface of :class:`serve.runtime.triton_server.TritonServer`
(``start``/``stop``/``with``, ``http_url``, ``grpc_url``, ``metrics_url``, ``admin_key``,
``pid``), so clients, tools and tests use either. What it does on ``start``:

1. binds the public HTTP, gRPC and metrics sockets itself - a port in use fails here,
   before anything is written (no key file of another running server is touched);
2. reads the repository: the public models (``<model>``, ``<model>_image``), the internal
   ones (``<model>_preprocess``) and the body cap (largest max batch x input size);
3. writes the front's configuration and the key files (mode 0600, folder 0700);
4. starts ``python -m serve.runtime.private`` in a new network namespace (serve/runtime/private.py):
   Triton inside, unrestricted but unreachable except through the front (no key in any
   argv), HAProxy serving the inherited public sockets. Where no namespace can be made,
   Triton listens on loopback ports with its own restriction (key in its argv, visible
   to local users through /proc) and a loud warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from serve.core import auth
from serve.core.errors import SetupError
from serve.runtime.front import find_haproxy, render
from serve.runtime.limits import (
    PRIVATE_PORTS,
    FrontLimits,
    RepositoryModels,
    front_options,
    repository_models,
)
from serve.runtime.private import PrivateSpec, namespace_prefix
from serve.runtime.triton_server import (
    LOOPBACK,
    ServerOptions,
    TritonInstall,
    free_port,
    http_status,
    log_tail,
    server_command,
)

log = logging.getLogger(__name__)


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise OSError(
            e.errno, f"cannot listen on {host}:{port}: {e.strerror} (another server there?)"
        ) from e
    s.listen(4096)
    s.set_inheritable(True)
    return s


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class PublicServer:
    """The front + private tritonserver as one child process tree."""

    def __init__(
        self,
        opts: ServerOptions,
        limits: FrontLimits | None = None,
        log_path: str | Path | None = None,
        inherit_output: bool = False,
    ) -> None:
        self.opts = opts
        self.limits = limits or FrontLimits()
        self.log_path = Path(log_path) if log_path else None
        self.inherit_output = inherit_output
        self.process: subprocess.Popen | None = None
        self.in_namespace = False
        self.private_why = ""
        self._sockets: list[socket.socket] = []
        self._key_files: list[Path] = []
        self._workdir: Path | None = None
        self._log = None

    # -- the TritonServer interface ------------------------------------------------------
    @property
    def admin_key(self) -> str | None:
        return self.opts.admin_key or None

    @property
    def _client_host(self) -> str:
        return LOOPBACK if self.opts.host in ("0.0.0.0", "::", "") else self.opts.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.opts.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.opts.grpc_port}"

    local_grpc_url = grpc_url

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.opts.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        """tritonserver's PID (a child of the private supervisor)."""
        assert self.process is not None
        for _ in range(100):
            kids = child_pids(self.process.pid)
            for k in kids:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{k}/exe").resolve().name == "tritonserver":
                        return k
            time.sleep(0.05)
        raise SetupError("tritonserver is not running under the front's supervisor")

    def front_stats(self) -> list[dict[str, str]]:
        """HAProxy's ``show stat`` (one dict per frontend/backend/server row)."""
        assert self._workdir is not None
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self._workdir / "haproxy.sock"))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = data.decode().strip().splitlines()
        head = rows[0].lstrip("# ").split(",")
        return [dict(zip(head, r.split(","), strict=False)) for r in rows[1:] if r]

    def haproxy_pid(self) -> int | None:
        """The front's PID, or None while it is being restarted."""
        assert self.process is not None
        for k in child_pids(self.process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{k}/exe").resolve().name == "haproxy":
                    return k
        return None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> PublicServer:
        """Bind the public ports, start the private stack, wait until the front answers
        ready; a no-op while it already runs."""
        if self.process is not None and self.process.poll() is None:
            return self
        haproxy = find_haproxy()
        install = TritonInstall.find()
        repo = Path(self.opts.model_repository)
        models = repository_models(repo)
        self._sockets = [
            listen_socket(self.opts.host, p)
            for p in (self.opts.http_port, self.opts.grpc_port, self.opts.metrics_port)
        ]
        try:
            self._start(haproxy, install, models, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(
        self, haproxy: str, install: TritonInstall, models: RepositoryModels, timeout: float
    ) -> None:
        prefix, why = (
            ([], "asked for loopback")
            if self.limits.private == "loopback"
            else (namespace_prefix())
        )
        if not prefix and self.limits.private == "namespace":
            raise SetupError(f"no private network namespace for Triton: {why}")
        self.in_namespace, self.private_why = bool(prefix), why
        if self.in_namespace:
            ports = PRIVATE_PORTS
            triton_opts = replace(
                self.opts,
                host=LOOPBACK,
                http_port=ports[0],
                grpc_port=ports[1],
                metrics_port=ports[2],
                restricted=False,  # the front enforces the key; nothing else reaches Triton
            )
        else:
            ports = (free_port(), free_port(), free_port())
            triton_opts = replace(
                self.opts,
                host=LOOPBACK,
                http_port=ports[0],
                grpc_port=ports[1],
                metrics_port=ports[2],
                restricted=True,
            )
            log.warning(
                "NO PRIVATE NAMESPACE for tritonserver (%s): it listens on 127.0.0.1:%d-%d, "
                "which every local user can reach, and its admin key is in its argv "
                "(readable in /proc by local users). Run as root or allow unprivileged "
                "user namespaces to keep Triton private.",
                why,
                ports[0],
                ports[2],
            )
        token = ""
        if self.limits.inference_key:
            # Triton refuses inference without this header itself (after reading the body:
            # a clear error, where HAProxy 2.6 would reset a half-read stream); the
            # front sets it for clients with the inference key. Only the front reaches a
            # namespaced Triton, so the token in its argv is worth nothing to local users.
            token = auth.new_key()
            triton_opts.extra_args = [
                *triton_opts.extra_args,
                f"--grpc-restricted-protocol=inference:inference-key={token}",
                f"--http-restricted-api=inference:inference-key={token}",
            ]
        self._workdir = Path(tempfile.mkdtemp(prefix="trainserve-front-"))
        os.chmod(self._workdir, 0o700)
        tls_pem = ""
        if self.limits.tls_cert:
            pem = (
                Path(self.limits.tls_cert).read_text()
                + "\n"
                + Path(self.limits.tls_key).read_text()
            )
            tls_pem = str(write_private(self._workdir / "tls.pem", pem))
        fds = [s.fileno() for s in self._sockets]
        front = front_options(
            self.limits,
            models,
            fds,
            ports,
            admin_key=self.opts.admin_key if self.opts.restricted else "",
            tls_pem=tls_pem,
            inference_token=token,
            stats_socket=str(self._workdir / "haproxy.sock"),
        )
        cfg = write_private(self._workdir / "haproxy.cfg", render(front))
        check = subprocess.run(
            [haproxy, "-c", "-f", str(cfg)], capture_output=True, pass_fds=tuple(fds)
        )
        if check.returncode != 0:
            out = (check.stdout + check.stderr).decode(errors="replace")
            raise SetupError(f"haproxy refused the generated configuration {cfg}: {out[-2000:]}")
        spec = PrivateSpec(
            triton_cmd=server_command(install, triton_opts),
            triton_env={
                **install.environment(jemalloc=triton_opts.jemalloc_path()),
                # the preprocess models' slow-image lane (serve/core/preprocess.py SlowLane)
                "TRAINSERVE_RUNTIME_DIR": str(self._workdir),
            },
            triton_http=f"{LOOPBACK}:{ports[0]}",
            haproxy_cmd=[haproxy, "-W", "-db", "-f", str(cfg)],
            pass_fds=fds,
            in_namespace=self.in_namespace,
            host_mount_namespace=os.readlink("/proc/self/ns/mnt"),
            ready_timeout=timeout,
            exit_timeout=float(self.opts.exit_timeout + 10),
        )
        spec_path = spec.write(self._workdir / "spec.json")
        out = None if self.inherit_output else subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("wb")
            out = self._log
        self._key_files = self.opts.write_key_files() + [
            auth.write_key_file(auth.metrics_url_file(u), self.metrics_url) for u in self.opts.urls
        ]
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "serve.runtime.private", str(spec_path)],
            pass_fds=tuple(fds),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        self.wait_ready(timeout)
        if self.in_namespace:  # where this user's shared-memory clients put their regions
            folder = f"/proc/{self.pid}/root/dev/shm"
            self._key_files += [auth.write_shm_dir_file(u, folder) for u in self.opts.urls]

    @property
    def shm_dir(self) -> str | None:
        """The private /dev/shm of Triton, as this machine's owner reaches it."""
        return f"/proc/{self.pid}/root/dev/shm" if self.in_namespace else None

    def _get(self, path: str) -> int:
        return http_status(f"http://{self.http_url}{path}")

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until the front answers ready; raise with the log tail if the stack dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SetupError(
                    f"the server stack exited with {self.process.returncode}{self._log_tail()}"
                )
            if not self.limits.tls_cert and self.is_ready():
                return
            if self.limits.tls_cert and self._tls_ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f}s{self._log_tail()}")

    def _tls_ready(self) -> bool:
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            url = f"https://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                return r.status == 200
        except OSError:
            return False

    def _log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the stack (front first, then Triton), wait, SIGKILL the group if needed;
        the key files, sockets and the private folder go."""
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

    def __enter__(self) -> PublicServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]
