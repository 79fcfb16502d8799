"""Triton and its front inside a private network namespace (``python -m serve.runtime.private``).

``serve run`` opens the public listening sockets itself, in the host's network
namespace, then starts this module under ``unshare --net --mount`` (as root) or ``unshare --user
--map-root-user --net --mount`` (as an ordinary user, where unprivileged user namespaces are
allowed). In the new namespace only a loopback interface exists: tritonserver binds its
fixed ports there, where no other process of the machine can connect (another local
user cannot enter the namespace). HAProxy runs in the same namespace and serves the
inherited public sockets (``bind fd@N``: a socket stays in the namespace it was made in),
so the front adds no extra hop. /dev/shm there is a private tmpfs, so the python
backend's IPC regions (every request's tensors) are the owner's alone; the owner's
shared-memory client creates its regions in that folder through
``/proc/<tritonserver>/root/dev/shm``. Without ``unshare`` (see :func:`namespace_prefix`) the
same module runs in the host namespace with Triton on loopback ports (the fallback).

This process supervises them all: one tritonserver per local replica (``serve run
--replicas N``, each on its own private ports), each restarted when it dies - at once,
then with a growing backoff, and given up (loudly, with the reason it died) after
:data:`FAST_DEATHS` deaths each within :data:`FAST_DEATH_S` of its start; HAProxy is
restarted when it dies (a crash of the front never takes a Triton down). While a replica
is dead or restarting, the front's health checks keep it out of rotation and retry what
it failed on another replica. When every replica has been given up, everything ends
with the last one's exit code. SIGTERM/SIGINT stop HAProxy, then the tritonservers
(cleanly, within their exit timeout). Everything here runs with umask 077, so Triton's
and the python backend's files and IPC regions in /dev/shm are the owner's alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("serve.runtime.private")


FAST_DEATHS = 5  # a replica that dies this many times in a row, each time
FAST_DEATH_S = 30.0  # within this long of its start, is given up
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0)  # wait before the n-th restart in a row


@dataclass
class ReplicaSpec:
    """One local tritonserver: its replica name, command, environment and HTTP address."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    http: str  # HOST:PORT its HTTP listens on (for readiness)
    # its private HOST:PORTs -> what clients use instead ("gRPC 127.0.0.1:8001"): its log
    # lines that name a private address say so (Triton knows only its own ports)
    public_names: dict[str, str] = field(default_factory=dict)


@dataclass
class PrivateSpec:
    """What the child runs (written by the parent to a 0600 file, read once)."""

    replicas: list[ReplicaSpec]
    haproxy_cmd: list[str]
    pass_fds: list[int] = field(default_factory=list)
    in_namespace: bool = True
    host_mount_namespace: str = ""  # the parent's (never mount over the machine's /dev/shm)
    ready_timeout: float = 600.0
    exit_timeout: float = 30.0

    def write(self, path: Path) -> Path:
        """Save as JSON, mode 0600 (the environment may name key paths)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        return path

    @classmethod
    def read(cls, path: Path) -> PrivateSpec:
        raw = json.loads(path.read_text())
        raw["replicas"] = [ReplicaSpec(**r) for r in raw["replicas"]]
        return cls(**raw)


def namespace_prefix() -> tuple[list[str], str]:
    """The command prefix that gives a child its own network namespace, and why not when
    empty: ``unshare --net --mount`` as root, ``unshare --user --map-root-user --net
    --mount`` otherwise (probed: that needs unprivileged user namespaces)."""
    unshare = shutil.which("unshare")
    if not unshare:
        return [], "no `unshare` (util-linux) on this machine"
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    prefix = [unshare, *user, "--net", "--mount"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"`{' '.join(prefix)}` failed: {e}"
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        return (
            [],
            f"`{' '.join(prefix)}` is not allowed here: {why[-1] if why else probe.returncode}",
        )
    return prefix, ""


def _loopback_up() -> None:
    """Bring ``lo`` up in a fresh network namespace (``ip``, else the SIOCSIFFLAGS ioctl)."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    if Path(ip).exists() and subprocess.run([ip, "link", "set", "lo", "up"]).returncode == 0:
        return
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, ifreq))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def _private_shm(host_mnt: str) -> None:
    """A private tmpfs on /dev/shm (this mount namespace only): the python backend's IPC
    regions - every request's tensors - are invisible to other local users. (Its stubs
    make them 0644 whatever the umask: boost.interprocess chmods what it creates.)"""
    if os.readlink("/proc/self/ns/mnt") == host_mnt:
        log.error("WARNING: not in a mount namespace of its own: /dev/shm left as it is")
        return
    mount = shutil.which("mount") or "/usr/bin/mount"
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "mode=0700,nosuid,nodev", "tmpfs", "/dev/shm"],
        capture_output=True,
    )
    if done.returncode != 0:
        log.error(
            "WARNING: no private /dev/shm (%s): the python backend's regions are visible "
            "in the machine's /dev/shm",
            done.stderr.decode(errors="replace").strip(),
        )


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (PR_SET_PDEATHSIG), so
    a supervisor killed with SIGKILL leaves no server behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _constant(text: bytes) -> Callable[[re.Match[bytes]], bytes]:
    """A ``re.sub`` replacement that is ``text`` as it is (no backslash escapes)."""
    return lambda _match: text


def relay_log(stream: IO[bytes], names: dict[str, str], replica: str) -> None:
    """Copy a tritonserver's output to this process's stderr, line by line, each private
    address followed by what clients use instead; returns at end of output."""
    marks = [
        (
            re.compile(rb"(?<![\d.])" + re.escape(addr.encode()) + rb"(?!\d)"),
            f"{addr} (replica {replica}, private; clients use {public})".encode(),
        )
        for addr, public in names.items()
    ]
    for line in iter(lambda: stream.readline(1 << 16), b""):  # a line at most 64 KiB
        for pattern, text in marks:
            line = pattern.sub(_constant(text), line)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()


class Replica:
    """A local tritonserver kept running: started, restarted when it dies (with backoff),
    given up after repeated fast deaths."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.fast_deaths = 0
        self.restart_at = 0.0
        self.given_up = False
        self.last_code: int | None = None
        self.relay: threading.Thread | None = None

    def start(self) -> None:
        # A process group of its own: its python-backend stubs outlive a killed tritonserver
        # (they do not watch their parent), and are killed with the group when it dies.
        names = self.spec.public_names
        self.proc = subprocess.Popen(
            self.spec.cmd,
            env=self.spec.env,
            preexec_fn=die_with_parent,
            process_group=0,
            stdout=subprocess.PIPE if names else None,
            stderr=subprocess.STDOUT if names else None,
        )
        if names:
            self.relay = threading.Thread(
                target=relay_log, args=(self.proc.stdout, names, self.spec.name), daemon=True
            )
            self.relay.start()
        self.started = time.monotonic()
        log.info("replica %s: tritonserver started (pid %d)", self.spec.name, self.proc.pid)

    def tend(self) -> None:
        """Restart a dead one when its backoff is over; give it up after fast deaths."""
        if self.given_up or self.proc is None:
            return
        code = self.proc.poll()
        if code is None:
            if time.monotonic() - self.started > FAST_DEATH_S:
                self.fast_deaths = 0
            return
        now = time.monotonic()
        if not self.restart_at:  # it just died: say why, schedule the restart
            self.kill_leftovers()
            self.last_code = code
            why = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit {code}"
            fast = now - self.started < FAST_DEATH_S
            self.fast_deaths = self.fast_deaths + 1 if fast else 1
            if self.fast_deaths >= FAST_DEATHS:
                self.given_up = True
                log.error(
                    "replica %s: tritonserver died (%s), %d times in a row within %.0f s of "
                    "its start: GIVING UP on this replica (see its log above)",
                    self.spec.name,
                    why,
                    self.fast_deaths,
                    FAST_DEATH_S,
                )
                return
            wait = BACKOFF_S[min(self.fast_deaths - 1, len(BACKOFF_S) - 1)]
            log.error(
                "replica %s: tritonserver (pid %d) died (%s) after %.1f s; restarting it in "
                "%.1f s (the front keeps it out of rotation until it is ready)",
                self.spec.name,
                self.proc.pid,
                why,
                now - self.started,
                wait,
            )
            self.restart_at = now + wait
        if now >= self.restart_at:
            self.restart_at = 0.0
            self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_leftovers(self) -> None:
        """Kill what is left of a dead tritonserver's process group (its stubs)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        if self.proc is None:
            return 1
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.kill_leftovers()
        if self.relay is not None:  # its last lines (the unloads) before this process ends
            self.relay.join(5.0)
        return self.proc.returncode


def run(spec: PrivateSpec) -> int:
    """Start the Tritons, wait until one is ready, start (and keep restarting) HAProxy,
    keep every Triton running; returns the exit code of the last replica given up (0
    after a stop)."""
    os.umask(0o077)
    if spec.in_namespace:
        _loopback_up()
        _private_shm(spec.host_mount_namespace)
    stop = threading.Event()
    replicas = [Replica(r) for r in spec.replicas]
    for r in replicas:
        r.start()
    haproxy: subprocess.Popen | None = None

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = time.monotonic() + spec.ready_timeout
    while not stop.is_set() and not any(r.alive() and _ready(r.spec.http) for r in replicas):
        if time.monotonic() > deadline or all(not r.alive() for r in replicas):
            log.error("no tritonserver ready after %.0f s", spec.ready_timeout)
            stop.set()
        stop.wait(0.2)
    restarts = 0
    while not stop.is_set():
        for r in replicas:
            r.tend()
        if all(r.given_up for r in replicas):
            break
        if haproxy is None or haproxy.poll() is not None:
            if haproxy is not None:
                restarts += 1
                log.error(
                    "the front (haproxy) exited with %s; restarting it (restart %d)",
                    haproxy.returncode,
                    restarts,
                )
            haproxy = subprocess.Popen(
                spec.haproxy_cmd, pass_fds=tuple(spec.pass_fds), preexec_fn=die_with_parent
            )
        stop.wait(0.2)
    # everything is told to stop at once, then waited for (a slow one delays no other)
    if haproxy is not None and haproxy.poll() is None:
        haproxy.terminate()
    for r in replicas:
        r.stop(spec.exit_timeout)
    if haproxy is not None:
        try:
            haproxy.wait(10)
        except subprocess.TimeoutExpired:
            haproxy.kill()
    codes = [r.wait(spec.exit_timeout) for r in replicas]
    if all(r.given_up for r in replicas):
        return next((r.last_code for r in replicas if r.last_code), 1) or 1
    return max(codes) if any(c > 0 for c in codes) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.runtime.private SPEC.json``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    die_with_parent()  # `serve run` (or a test) killed outright: stop, do not linger
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serve.runtime.private SPEC.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    spec = PrivateSpec.read(path)
    path.unlink(missing_ok=True)
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
