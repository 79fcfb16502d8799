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
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from serve.core import auth
from serve.core.errors import SetupError
from serve.runtime.front import find_haproxy
from serve.runtime.front_config import render
from serve.runtime.front_options import Replica
from serve.runtime.handle import ServerHandle, free_port
from serve.runtime.install import TritonInstall
from serve.runtime.limits import (
    OWNER_PORTS,
    FrontLimits,
    RepositoryModels,
    front_options,
    local_replica,
    replica_ports,
    repository_models,
)
from serve.runtime.private import PrivateSpec, ReplicaSpec, die_with_parent, namespace_prefix
from serve.runtime.server_options import LOOPBACK, ServerOptions, server_command

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


class PublicServer(ServerHandle):
    """The front + private tritonserver as one child process tree."""

    def __init__(
        self,
        opts: ServerOptions,
        limits: FrontLimits | None = None,
        log_path: str | Path | None = None,
        inherit_output: bool = False,
        owner_listeners: bool = False,
        replicas: int = 1,
        remote: list[Replica] | None = None,
    ) -> None:
        super().__init__(opts, log_path, inherit_output)
        self.limits = limits or FrontLimits()
        if replicas < 1 and not remote:
            raise SetupError("serve run needs at least one replica (local or --replica)")
        self.replica_count = replicas  # local tritonservers, each on its own private ports
        self.remote = list(remote or [])  # other machines' servers behind the same front
        self.replicas: list[Replica] = []
        self.in_namespace = False
        self.private_why = ""
        # the front's keyless owner listeners: always inside the private namespace (only
        # the owner enters it); on loopback only when asked (make bench without a
        # namespace: every local user reaches them while it runs, as they reach Triton)
        self.owner_listeners = owner_listeners
        self._owner_ports: tuple[int, int] | None = None
        self._egress_proc: subprocess.Popen | None = None

    # -- the TritonServer interface (the URLs and admin_key: ServerHandle) ---------------
    @property
    def pid(self) -> int:
        """The first local tritonserver's PID (a child of the private supervisor)."""
        pids = self.triton_pids()
        if not pids:
            raise SetupError("tritonserver is not running under the front's supervisor")
        return pids[0]

    def triton_pids(self, wait: float = 5.0) -> list[int]:
        """The local tritonservers' PIDs, oldest first (a restarted replica's is new)."""
        assert self.process is not None
        end = time.monotonic() + wait
        while True:
            found = []
            for k in child_pids(self.process.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{k}/exe").resolve().name == "tritonserver":
                        found.append(k)
            if found or time.monotonic() > end:
                return sorted(found, key=lambda k: Path(f"/proc/{k}").stat().st_mtime)
            time.sleep(0.05)

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
    def check_ports(self) -> None:
        """Fail now (one line: which port, and why) if a public port is taken - before
        anything is printed or written, e.g. by a second ``make serve``."""
        for p in (self.opts.http_port, self.opts.grpc_port, self.opts.metrics_port):
            listen_socket(self.opts.host, p).close()

    def start(self, timeout: float = 180.0) -> PublicServer:
        """Bind the public ports, start the private stack, wait until the front answers
        ready; a no-op while it already runs."""
        if self._running():
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
        prefix = self._private_prefix()
        if self.remote and not self.in_namespace:
            raise SetupError("remote replicas need Triton's private namespace (root or user ns)")
        self._workdir = Path(tempfile.mkdtemp(prefix="trainserve-front-"))
        os.chmod(self._workdir, 0o700)
        specs: list[ReplicaSpec] = []
        self.replicas = []
        token = ""
        for i in range(self.replica_count):
            ports, triton_opts = self._triton_options(i)
            token = token or self._inference_token(triton_opts)
            if token:
                triton_opts.extra_args = [*triton_opts.extra_args, *self._token_flags(token)]
            # each replica's slow-image lane (serve/backend/isolated_decode.py SlowLane)
            runtime = self._workdir / f"replica-r{i}"
            runtime.mkdir(mode=0o700)
            specs.append(
                ReplicaSpec(
                    name=f"r{i}",
                    cmd=server_command(install, triton_opts),
                    env={
                        **install.environment(jemalloc=triton_opts.jemalloc_path()),
                        "TRAINSERVE_RUNTIME_DIR": str(runtime),
                    },
                    http=f"{LOOPBACK}:{ports[0]}",
                    public_names=self._public_names(ports),
                )
            )
            self.replicas.append(local_replica(i, ports))
        self.replicas += self._egress(haproxy) if self.remote else []
        fds = [s.fileno() for s in self._sockets]
        cfg = self._write_front(haproxy, models, fds, token)
        spec = PrivateSpec(
            replicas=specs,
            haproxy_cmd=[haproxy, "-W", "-db", "-f", str(cfg)],
            pass_fds=fds,
            in_namespace=self.in_namespace,
            host_mount_namespace=os.readlink("/proc/self/ns/mnt"),
            ready_timeout=timeout,
            exit_timeout=float(self.opts.exit_timeout + 10),
        )
        spec_path = spec.write(self._workdir / "spec.json")
        self._write_key_files()
        self._spawn(
            [*prefix, sys.executable, "-m", "serve.runtime.private", str(spec_path)],
            pass_fds=tuple(fds),
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        self.wait_ready(timeout)
        if self.in_namespace:  # where this user's shared-memory clients put their regions
            folder = f"/proc/{self.pid}/root/dev/shm"
            self._key_files += [auth.write_shm_dir_file(u, folder) for u in self.opts.urls]

    def _egress(self, haproxy: str) -> list[Replica]:
        """The remote replicas as the front reaches them: Triton's private namespace has no
        route out, so a second HAProxy in this (the machine's) namespace relays each remote
        replica's ports (TCP: TLS and the health checks pass through) from Unix sockets in
        the private folder (0700), which the front, in the namespace, connects to."""
        assert self._workdir is not None
        lines = [
            "# Generated by `python -m serve run`: the remote replicas egress (stack.py)",
            "global",
            "    maxconn 4000",
            "    log stderr format short local0 warning",
            "defaults",
            "    mode tcp",
            "    log global",
            "    timeout connect 5s",
            f"    timeout client {self.limits.request_timeout_s + 30:g}s",
            f"    timeout server {self.limits.request_timeout_s + 30:g}s",
        ]
        reached = []
        for r in self.remote:
            via = str(self._workdir / f"egress-{r.name}")
            for wire, port in (
                ("http", r.http_port),
                ("grpc", r.grpc_port),
                ("metrics", r.metrics_port),
            ):
                lines += [
                    f"listen egress_{r.name}_{wire}",
                    f"    bind unix@{via}-{wire}.sock mode 600",
                    f"    server {r.name} {r.address(port)}",
                ]
            reached.append(replace(r, via=via))
        cfg = write_private(self._workdir / "egress.cfg", "\n".join(lines) + "\n")
        check = subprocess.run([haproxy, "-c", "-q", "-f", str(cfg)], capture_output=True)
        if check.returncode != 0:
            out = (check.stdout + check.stderr).decode(errors="replace")
            raise SetupError(f"haproxy refused the egress configuration {cfg}: {out[-2000:]}")
        self._egress_proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=None if self.inherit_output else subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,  # serve run killed outright: no relay left behind
        )
        return reached

    def _private_prefix(self) -> list[str]:
        """The command prefix of a private network namespace for the stack ([] on
        loopback: asked for, or no namespace to be had where ``private`` allows it)."""
        prefix, why = (
            ([], "asked for loopback")
            if self.limits.private == "loopback"
            else (namespace_prefix())
        )
        if not prefix and self.limits.private == "namespace":
            raise SetupError(f"no private network namespace for Triton: {why}")
        self.in_namespace, self.private_why = bool(prefix), why
        return prefix

    def _public_names(self, ports: tuple[int, int, int]) -> dict[str, str]:
        """A replica's private addresses -> the public ones its clients use."""
        o = self.opts
        public = (
            f"HTTP {o.host}:{o.http_port}",
            f"gRPC {o.host}:{o.grpc_port}",
            f"metrics {o.host}:{o.metrics_port}",
        )
        return {f"{LOOPBACK}:{p}": name for p, name in zip(ports, public, strict=True)}

    def _triton_options(self, index: int = 0) -> tuple[tuple[int, int, int], ServerOptions]:
        """Replica ``index``'s ports (HTTP, gRPC, metrics) and options behind the front:
        fixed ports, unrestricted, in the namespace; free loopback ports, restricted,
        without."""
        ports = (
            replica_ports(index) if self.in_namespace else (free_port(), free_port(), free_port())
        )
        triton_opts = replace(
            self.opts,
            host=LOOPBACK,
            http_port=ports[0],
            grpc_port=ports[1],
            metrics_port=ports[2],
            # in the namespace the front enforces the key; nothing else reaches Triton
            restricted=not self.in_namespace,
        )
        if not self.in_namespace:
            log.warning(
                "NO PRIVATE NAMESPACE for tritonserver (%s): it listens on 127.0.0.1:%d-%d, "
                "which every local user can reach, and its admin key is in its argv "
                "(readable in /proc by local users). Run as root or allow unprivileged "
                "user namespaces to keep Triton private.",
                self.private_why,
                ports[0],
                ports[2],
            )
        return ports, triton_opts

    def _inference_token(self, triton_opts: ServerOptions) -> str:
        """With an inference key: the token Triton requires for inference, which the
        front sets for clients with the key; else ""."""
        if not self.limits.inference_key:
            return ""
        # Triton refuses inference without this header itself (after reading the body:
        # a clear error, where HAProxy 2.6 would reset a half-read stream); the
        # front sets it for clients with the inference key. Only the front reaches a
        # namespaced Triton, so the token in its argv is worth nothing to local users.
        return auth.new_key()

    @staticmethod
    def _token_flags(token: str) -> list[str]:
        return [
            f"--grpc-restricted-protocol=inference:inference-key={token}",
            f"--http-restricted-api=inference:inference-key={token}",
        ]

    def _write_front(
        self,
        haproxy: str,
        models: RepositoryModels,
        fds: list[int],
        token: str,
    ) -> Path:
        """The front's configuration (and TLS file) in the private folder, checked by
        ``haproxy -c``."""
        assert self._workdir is not None
        tls_pem = ""
        if self.limits.tls_cert:
            pem = (
                Path(self.limits.tls_cert).read_text()
                + "\n"
                + Path(self.limits.tls_key).read_text()
            )
            tls_pem = str(write_private(self._workdir / "tls.pem", pem))
        # inside the private namespace: the owner's listeners (perf_analyzer, run there
        # by serve.tools.perf_analyzer, needs no key in its argv)
        owner = (
            {
                "owner_http": f"{LOOPBACK}:{OWNER_PORTS[0]}",
                "owner_grpc": f"{LOOPBACK}:{OWNER_PORTS[1]}",
            }
            if self.in_namespace
            else {}
        )
        front = front_options(
            self.limits,
            models,
            fds,
            self.replicas,
            admin_key=self.opts.admin_key if self.opts.restricted else "",
            tls_pem=tls_pem,
            inference_token=token,
            stats_socket=str(self._workdir / "haproxy.sock"),
            **owner,
        )
        cfg = write_private(self._workdir / "haproxy.cfg", render(front))
        check = subprocess.run(
            [haproxy, "-c", "-f", str(cfg)], capture_output=True, pass_fds=tuple(fds)
        )
        if check.returncode != 0:
            out = (check.stdout + check.stderr).decode(errors="replace")
            raise SetupError(f"haproxy refused the generated configuration {cfg}: {out[-2000:]}")
        return cfg

    def perf_url(self, wire: str, direct: bool = False) -> tuple[str, int]:
        """Where a tool of the owner's (perf_analyzer) reaches this server without a key:
        the front's owner listener (``direct``: Triton itself, skipping the front) for
        ``wire`` ("http" or "grpc"), and the PID whose namespaces it must run in (0: this
        one's)."""
        http = wire == "http"
        if self.in_namespace:
            ports = replica_ports(0) if direct else OWNER_PORTS
            return f"{LOOPBACK}:{ports[0 if http else 1]}", self.pid
        if direct:
            raise SetupError("Triton is reached directly only inside its namespace")
        if not self._owner_ports:
            raise SetupError("this server was started without owner listeners")
        return f"{LOOPBACK}:{self._owner_ports[0 if http else 1]}", 0

    @property
    def shm_dir(self) -> str | None:
        """The private /dev/shm of Triton, as this machine's owner reaches it."""
        return f"/proc/{self.pid}/root/dev/shm" if self.in_namespace else None

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until the front answers ready; raise with the log tail if the stack dies."""
        self._wait_ready(timeout, "the server stack", "server")

    def _answers_ready(self) -> bool:
        return self._tls_ready() if self.limits.tls_cert else self.is_ready()

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

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the stack (front first, then Triton), wait, SIGKILL the group if needed;
        the key files, sockets and the private folder go."""
        if self._egress_proc is not None:
            self._egress_proc.terminate()
            try:
                self._egress_proc.wait(10)
            except subprocess.TimeoutExpired:
                self._egress_proc.kill()
            self._egress_proc = None
        return self._stop(timeout)


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]
