"""Replicas behind the front: a dead tritonserver costs no request, restarts, rollouts and
rollbacks under load, control calls that reach every replica, shared memory with two
replicas, and a replica on another host (a network namespace of the test's own).

Everything against the real front and real tritonservers (``serve run``'s stack)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serve.backend.preprocess import ResizeCrop, preprocess
from serve.core import auth
from serve.core.names import IMAGE_INPUT, INPUT_NAME
from tests.helpers import wait_until

GEOMETRY = ResizeCrop(256, 224)


def _stack(repo: Path, tmp_path: Path, replicas: int = 2, remote=None):
    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.stack import PublicServer

    opts = ServerOptions(
        model_repository=str(repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout=3,
    )
    return PublicServer(
        opts, log_path=tmp_path / "stack.log", replicas=replicas, remote=remote or []
    )


def _copy_repo(model_repo: Path, tmp_path: Path) -> Path:
    """A repository of the test's own (it publishes into it)."""
    from serve.tools.chaos import scratch_repository

    return scratch_repository(model_repo, tmp_path)


class Load:
    """Closed-loop mixed tensor / raw-image gRPC requests at ``concurrency`` until stopped;
    every outcome recorded (ok, version, error)."""

    def __init__(self, url: str, image: bytes, pixels: np.ndarray, concurrency: int = 4):
        self.url, self.image, self.pixels = url, image, pixels
        self.results: list[tuple[bool, str]] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(concurrency)
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _run(self, k: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        tensor = grpcclient.InferInput(INPUT_NAME, list(self.pixels.shape), "FP32")
        tensor.set_data_from_numpy(self.pixels)
        raw = grpcclient.InferInput(IMAGE_INPUT, [1, 1], "BYTES")
        raw.set_data_from_numpy(np.array([[self.image]], dtype=object))
        n = k
        try:
            while not self.stop.is_set():
                n += 1
                try:
                    if n % 2:
                        r = client.infer("antsbees", [tensor], client_timeout=60)
                        version = r.get_response().model_version
                    else:  # the ensemble answers as its own (one) version
                        r = client.infer("antsbees_image", [raw], client_timeout=60)
                        version = ""
                    self.results.append((True, version))
                except InferenceServerException as e:
                    self.results.append((False, str(e)[:200]))
        finally:
            client.close()

    def failures(self) -> list[str]:
        return [why for ok, why in self.results if not ok]


@pytest.fixture(scope="module")
def sample(val_images: list[Path]) -> tuple[bytes, np.ndarray]:
    return val_images[0].read_bytes(), preprocess(val_images[0], GEOMETRY)[None]


def _group(pgid: int) -> list[int]:
    """The processes of one process group (a tritonserver's stubs, after it died)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _up(srv, count: int) -> bool:
    from serve.client import admin

    reps = admin.replicas(srv.grpc_url)
    return len(reps) == count and all(r.up for r in reps)


def test_a_killed_replica_costs_no_request(model_repo, tmp_path, sample):
    """Two replicas under load at concurrency 4; one tritonserver killed with SIGKILL:
    every request is answered (what the dead one failed is retried on the other), the
    dead one is restarted and back in rotation, its python-backend stubs do not outlive
    it, and both serve afterwards."""
    image, pixels = sample
    with _stack(model_repo, tmp_path) as srv:
        wait_until(lambda: _up(srv, 2), 60, "both replicas in rotation")
        before = srv.triton_pids()
        with Load(srv.grpc_url, image, pixels) as load:
            wait_until(lambda: len(load.results) > 40, 60, "load under way")
            assert len(_group(before[-1])) > 1  # the tritonserver and its stubs
            os.kill(before[-1], signal.SIGKILL)
            wait_until(lambda: not _up(srv, 2), 10, "the dead replica out of rotation")
            wait_until(lambda: _group(before[-1]) == [], 10, "its stubs gone with it")
            wait_until(lambda: _up(srv, 2), 60, "the restarted replica back in rotation")
            done = len(load.results)
            wait_until(lambda: len(load.results) > done + 40, 60, "load after the restart")
        assert load.failures() == [], load.failures()[:5]
        after = srv.triton_pids()
        assert before[0] in after and before[-1] not in after and len(after) == 2
        log = (tmp_path / "stack.log").read_text()
        assert "died (signal 9 (SIGKILL))" in log and "restarting it" in log


def test_a_single_replica_is_restarted_within_seconds(model_repo, tmp_path, sample):
    """With one replica, a killed tritonserver costs at most the gRPC calls it had in
    flight, each refused as retryable (REFUSED_STREAM: the client's retry is safe, and
    serve's clients make it); what arrives while it restarts waits for it at the front
    (retried on the same replica, a second apart) instead of a 503. It is restarted and
    ready within 10 s."""
    image, pixels = sample
    with _stack(model_repo, tmp_path, replicas=1) as srv:
        (pid,) = srv.triton_pids()
        with Load(srv.grpc_url, image, pixels, concurrency=2) as load:
            wait_until(lambda: len(load.results) > 20, 60, "load under way")
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: srv.triton_pids(0) not in ([], [pid]), 30, "a new tritonserver")
            wait_until(lambda: _up(srv, 1), 30, "the replica back in rotation")
            restart_s = time.monotonic() - killed
            done = len(load.results)
            wait_until(lambda: len(load.results) > done + 20, 60, "load after the restart")
        assert restart_s <= 10, restart_s
        failures = load.failures()
        assert len(failures) <= 2, failures  # the concurrency: those in flight at most
        assert all("error code 7" in f for f in failures), failures  # REFUSED_STREAM
        assert srv.triton_pids() != [pid]


def test_rollout_and_rollback_under_load_lose_nothing(model_repo, tmp_path, sample):
    """A new version published and loaded, then rolled back, on two replicas under load:
    no request fails; each answer names one whole version; after the rollout answers
    come from the new one, after the rollback from the old one."""
    from serve.client import admin
    from serve.tools.chaos import publish_copy

    image, pixels = sample
    repo = _copy_repo(model_repo, tmp_path / "work")
    with _stack(repo, tmp_path) as srv:
        wait_until(lambda: _up(srv, 2), 60, "both replicas in rotation")
        with Load(srv.grpc_url, image, pixels) as load:
            wait_until(lambda: len(load.results) > 20, 60, "load under way")
            new = publish_copy(repo, "antsbees")
            changed = admin.rollout(
                srv.grpc_url, None, "loading", lambda a: a.load("antsbees"), "antsbees"
            )
            assert changed == ["r0", "r1"]
            mark = len(load.results)
            wait_until(lambda: len(load.results) > mark + 40, 60, "load after the rollout")
            after_rollout = load.results[mark + 10 :]
            frm, to = admin.rollback(srv.grpc_url, "antsbees")
            mark = len(load.results)
            wait_until(lambda: len(load.results) > mark + 40, 60, "load after the rollback")
            after_rollback = load.results[mark + 10 :]
        assert load.failures() == [], load.failures()[:5]
        assert (frm, to) == (new, new - 1)
        assert {v for ok, v in after_rollout} == {"", str(new)}, after_rollout[:5]
        assert {v for ok, v in after_rollback} == {"", str(new - 1)}, after_rollback[:5]


def test_control_calls_reach_every_replica(model_repo, tmp_path):
    """With two replicas a control call must name its replica: an unnamed load or
    statistics call is refused saying so, a named one reaches that replica, and
    ``serve unload`` / ``load`` (the owner's tools) reach each in turn."""
    from serve.client import admin

    with _stack(model_repo, tmp_path) as srv:
        key = srv.admin_key
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="runs 2 replicas"):
                client.load_model("antsbees", headers=auth.headers(key))
            with pytest.raises(InferenceServerException, match="runs 2 replicas"):
                client.get_inference_statistics("antsbees", headers=auth.headers(key))
            with pytest.raises(InferenceServerException, match="names no replica"):
                client.get_inference_statistics(
                    "antsbees", headers={**auth.headers(key), admin.REPLICA_HEADER: "r7"}
                )
            for name in ("r0", "r1"):
                stats = client.get_inference_statistics(
                    "antsbees", headers={**auth.headers(key), admin.REPLICA_HEADER: name}
                )
                assert stats.model_stats
            # without the key, naming a replica is refused
            with pytest.raises(InferenceServerException):
                client.get_model_metadata("antsbees", headers={admin.REPLICA_HEADER: "r0"})
        finally:
            client.close()

        def states(name: str) -> set[str]:
            with admin.session(srv.grpc_url, key, replica=name) as a:
                return {m.state for m in a.index() if m.name == "antsbees_preprocess"}

        admin.unload(srv.grpc_url, "antsbees_preprocess")
        wait_until(lambda: "READY" not in states("r0") | states("r1"), 60, "unloaded on both")
        admin.load(srv.grpc_url, "antsbees_preprocess")
        assert states("r0") == states("r1") == {"READY"}
        health = admin.health(srv.grpc_url, srv.metrics_url, key)
        assert [r["name"] for r in health["replicas"]] == ["r0", "r1"]


def test_shared_memory_with_two_replicas(model_repo, tmp_path, sample):
    """The owner's shared-memory regions are registered with every local replica, so
    whichever replica takes a request finds its region: the same logits as without."""
    from serve.client import Classifier
    from serve.client.admin import read_metrics

    _, pixels = sample
    with _stack(model_repo, tmp_path) as srv:
        wait_until(lambda: _up(srv, 2), 60, "both replicas in rotation")
        with Classifier(srv.grpc_url, "antsbees") as plain:
            expected = plain.logits(pixels)
        with Classifier(srv.grpc_url, "antsbees", shared_memory=True) as c:
            for _ in range(16):
                np.testing.assert_array_equal(c.logits(pixels), expected)
        served = [
            read_metrics(srv.metrics_url, replica=r)
            .get(("antsbees", "1"), {})
            .get("nv_inference_request_success", 0)
            for r in ("r0", "r1")
        ]
        assert all(n > 0 for n in served), served


def _netns_available() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces with veth pairs)"
    if not shutil.which("ip"):
        return "no iproute2 `ip`"
    return ""


@pytest.fixture
def remote_host(model_repo, tmp_path):
    """Another host: a network namespace with a veth pair to this one (10.77.x.2) running
    `serve run` (its own front and private Triton, its own admin key)."""
    why = _netns_available()
    if why:
        pytest.skip(why)
    from tests.helpers import PY, ROOT

    tag = f"ts{os.getpid() % 100000}"
    ns, host_if, ns_if = f"{tag}ns", f"{tag}a", f"{tag}b"
    net = 10 + os.getpid() % 200
    ip = shutil.which("ip")

    def sh(*args: str) -> None:
        subprocess.run([ip, *args], check=True, capture_output=True)

    sh("netns", "add", ns)
    try:
        sh("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("link", "set", ns_if, "netns", ns)
        sh("addr", "add", f"10.77.{net}.1/24", "dev", host_if)
        sh("link", "set", host_if, "up")
        sh("-n", ns, "addr", "add", f"10.77.{net}.2/24", "dev", ns_if)
        sh("-n", ns, "link", "set", ns_if, "up")
        sh("-n", ns, "link", "set", "lo", "up")
        key_file = tmp_path / "remote.key"
        key_file.write_text(auth.new_key())
        key_file.chmod(0o600)
        env = {**os.environ, "TRAINSERVE_KEY_DIR": str(tmp_path / "remote-keys")}
        proc = subprocess.Popen(
            [ip, "netns", "exec", ns, PY, "-m", "serve", "run", "--model-repository"]
            + [str(model_repo), "--host", f"10.77.{net}.2", "--http-port", "8000"]
            + ["--grpc-port", "8001", "--metrics-port", "8002", "--watchdog", "0"]
            + ["--admin-key-file", str(key_file)],
            cwd=ROOT,
            env=env,
            stdout=(tmp_path / "remote.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        try:

            def ready() -> bool:
                import urllib.request

                url = f"http://10.77.{net}.2:8000/v2/health/ready"
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status == 200

            wait_until(ready, 180, "the remote host's serve run")
            yield f"10.77.{net}.2", key_file, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        subprocess.run([ip, "netns", "del", ns], capture_output=True)
        subprocess.run([ip, "link", "del", host_if], capture_output=True)


def test_a_remote_replica_serves_and_fails_over(model_repo, tmp_path, sample, remote_host):
    """A replica on another host (`--replica HOST:PORT,key=FILE`) behind the same front:
    in rotation beside the local one, requests answered by both, control calls reach it
    with its own key (never ours), and when it dies the local one takes everything."""
    from serve.cli.run import remote_replicas
    from serve.client import admin

    host, key_file, proc = remote_host
    image, pixels = sample
    remote = remote_replicas([f"{host}:8000,key={key_file}"], first=1)
    with _stack(model_repo, tmp_path, replicas=1, remote=remote) as srv:
        wait_until(lambda: _up(srv, 2), 60, "the local and the remote replica in rotation")
        reps = {r.name: r for r in admin.replicas(srv.grpc_url)}
        assert reps["r0"].local and not reps["r1"].local
        with Load(srv.grpc_url, image, pixels, concurrency=4) as load:
            wait_until(lambda: len(load.results) > 60, 120, "load over both")
        assert load.failures() == [], load.failures()[:5]
        assert all(r.requests > 10 for r in admin.replicas(srv.grpc_url)), admin.replicas(
            srv.grpc_url
        )
        with admin.session(srv.grpc_url, replica="r1") as a:  # its own key, set by the front
            assert any(m.name == "antsbees" for m in a.index())
        with Load(srv.grpc_url, image, pixels, concurrency=2) as load:
            wait_until(lambda: len(load.results) > 10, 60, "load under way")
            proc.send_signal(signal.SIGKILL)  # the remote host goes away
            wait_until(lambda: not _up(srv, 2), 20, "the remote out of rotation")
            done = len(load.results)
            wait_until(lambda: len(load.results) > done + 20, 60, "the local one serving")
        assert len(load.failures()) <= 2, load.failures()  # at most those answering there
