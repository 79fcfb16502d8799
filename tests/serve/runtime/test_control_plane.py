"""The locked control plane, a hung stub healed by the watchdog, a request with
one bad image among several, and bounded queues that reject a flood."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serve.backend.preprocess import ResizeCrop, preprocess
from serve.client import admin
from serve.client.client import Classifier
from serve.core import auth
from serve.core.model_config import parse_config
from serve.core.names import INPUT_NAME
from serve.runtime.server_options import ServerOptions
from serve.runtime.watchdog import Watchdog, WatchdogConfig, check_once
from tests.helpers import process_alive, stub_pids, wait_until

GEOMETRY = ResizeCrop(256, 224)


def _refused(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_control_plane_needs_the_admin_key(own_server, val_images, protocol):
    """Without the key (or with a wrong one) load, unload, shared-memory registration and
    statistics are refused and the model keeps serving; with the key they work.
    Inference, health and metadata stay open."""
    module = grpcclient if protocol == "grpc" else httpclient
    url = own_server.grpc_url if protocol == "grpc" else own_server.http_url
    pixels = preprocess(val_images[0], GEOMETRY)[None]
    with Classifier(url, "antsbees", protocol=protocol) as clf:
        expected = clf.logits(pixels)
    key = own_server.admin_key
    assert key and auth.resolve_key(url) == key  # the key file clients on this host use
    client = module.InferenceServerClient(url)
    try:
        for headers in (None, auth.headers("wrong-" + key)):
            for call in (
                lambda h=headers: client.unload_model("antsbees", headers=h),
                lambda h=headers: client.load_model("antsbees", headers=h),
                lambda h=headers: client.register_system_shared_memory(
                    "evil", "/evil", 64, headers=h
                ),
                lambda h=headers: client.get_inference_statistics("antsbees", headers=h),
            ):
                message = _refused(call)
                assert "restricted" in message.lower() or "unauth" in message.lower(), message
        # still serving, still open to everyone for inference, health and metadata
        assert client.is_server_ready() and client.is_model_ready("antsbees")
        assert client.get_model_metadata("antsbees")
        with Classifier(url, "antsbees", protocol=protocol) as clf:
            np.testing.assert_array_equal(clf.logits(pixels), expected)
        # with the key: the same calls work
        good = auth.headers(key)
        client.unload_model("antsbees_image", headers=good)
        wait_until(
            lambda: not client.is_model_ready("antsbees_image"), 60, "the ensemble to unload"
        )
        client.load_model("antsbees_image", headers=good)
        assert client.is_model_ready("antsbees_image")
        assert client.get_inference_statistics("antsbees", headers=good)
    finally:
        client.close()
    # the admin tools (gRPC) find the key by the server's URL
    names = {(m.name, m.state) for m in admin.list_models(own_server.grpc_url)}
    assert ("antsbees_image", "READY") in names


def test_unrestricted_server_only_on_loopback() -> None:
    with pytest.raises(ValueError, match="unrestricted control APIs"):
        ServerOptions(host="0.0.0.0", restricted=False)
    opts = ServerOptions(host="0.0.0.0", admin_key="k" * 16)
    assert opts.restricted and opts.admin_key == "k" * 16
    flags = auth.server_flags(opts.admin_key)
    assert any(f.startswith("--http-restricted-api=model-repository,shared-memory") for f in flags)


def _stub_of(server_pid: int, model: str) -> list[int]:
    """The stub processes of one model (their command line names its model.py)."""
    return [
        pid
        for pid in stub_pids(server_pid)
        if f"/{model}/".encode() in open(f"/proc/{pid}/cmdline", "rb").read()
    ]


def test_watchdog_heals_a_hung_stub(own_server, val_images):
    """A stub that stops answering (SIGSTOP: a native deadlock) makes probes time out;
    after `hung_rounds` rounds in a row the watchdog restarts the model and it answers."""
    pixels = preprocess(val_images[0], GEOMETRY)[None]
    with Classifier(own_server.grpc_url, "antsbees") as clf:
        expected = clf.logits(pixels)
    hung = _stub_of(own_server.pid, "antsbees")
    assert hung, "no stub process found for 'antsbees'"
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        dog = Watchdog(
            WatchdogConfig(url=own_server.grpc_url, timeout=2.0, hung_rounds=2), lambda _: None
        )
        first = dog.check_once()
        assert "antsbees:1" in first.timed_out or "antsbees" in first.restarted, first
        rounds = [first]

        def restarted() -> bool:
            if "antsbees" not in rounds[-1].restarted:
                rounds.append(dog.check_once())
            return "antsbees" in rounds[-1].restarted

        wait_until(restarted, 300, "the watchdog to restart the hung model", interval=0)
        assert len(rounds) <= 4, [r.timed_out for r in rounds]
        with Classifier(own_server.grpc_url, "antsbees") as clf:  # no retries needed
            np.testing.assert_array_equal(clf.logits(pixels), expected)
        # a new stub answers; the stopped one lingers (Triton cannot finish unloading it)
        assert set(_stub_of(own_server.pid, "antsbees")) - set(hung)
    finally:
        for pid in hung:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)  # a stopped stub would hold up shutdown


def test_watchdog_finds_one_dead_instance_among_several(own_server, val_images):
    """The classifier runs several instances on CPU (two by default); with one instance's
    stub killed and the other healthy, a watchdog round finds it (it probes as many times
    as the model has instances; Triton handed idle instances the probes in turn in every
    try here, so one round, but that order is not promised: up to three) and restarts the
    model: every request answers."""
    pixels = preprocess(val_images[0], GEOMETRY)[None]
    cfg = WatchdogConfig(url=own_server.grpc_url)
    with admin.session(own_server.grpc_url) as a:
        groups = (a.config("antsbees") or {}).get("instance_group", [])
        versions = [m for m in a.index() if m.name == "antsbees" and m.state == "READY"]
        instances = sum(int(g.get("count", 1)) for g in groups)
        assert instances >= 2, groups
        before = a.completed().get("antsbees", 0)
        assert check_once(cfg, log=lambda _: None).restarted == []  # healthy: left alone
        expected = instances * len(versions)  # one probe per instance of each version

        def probes() -> int:  # statistics may trail the answers a little
            done = a.completed().get("antsbees", 0) - before
            return done if done >= expected else 0

        assert wait_until(probes, 30, f"{expected} probes in the statistics") == expected
    victim = sorted(_stub_of(own_server.pid, "antsbees"))[-1]
    found = re.search(rb"/antsbees/(\d+)/", Path(f"/proc/{victim}/cmdline").read_bytes())
    version = found.group(1).decode() if found else ""
    with Classifier(own_server.grpc_url, "antsbees", version=version) as clf:
        expected = clf.logits(pixels)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not process_alive(victim), 30, "the killed stub to go")
    rounds = [check_once(cfg, log=lambda _: None)]
    while "antsbees" not in rounds[-1].restarted and len(rounds) < 3:
        rounds.append(check_once(cfg, log=lambda _: None))  # dispatch order not promised
    assert rounds[-1].restarted == ["antsbees"], rounds
    with Classifier(own_server.grpc_url, "antsbees", version=version) as clf:  # no retries
        for _ in range(6):
            np.testing.assert_array_equal(clf.logits(pixels), expected)


def test_one_bad_image_fails_the_whole_request_naming_it(server, val_images):
    """A request with several images where one is bad fails as a whole, naming the item;
    the server stays healthy and the next request is answered."""
    good = val_images[0].read_bytes()
    batch = np.array([[good], [b"not an image"], [val_images[1].read_bytes()]], dtype=object)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("IMAGE", list(batch.shape), "BYTES")
        inp.set_data_from_numpy(batch)
        message = _refused(lambda: client.infer("antsbees_image", [inp]))
        assert "bad image: item 1:" in message, message
        assert client.is_server_ready() and client.is_model_ready("antsbees_image")
        inp = grpcclient.InferInput("IMAGE", [2, 1], "BYTES")
        inp.set_data_from_numpy(batch[[0, 2]])
        assert client.infer("antsbees_image", [inp]).as_numpy("logits").shape == (2, 2)
    finally:
        client.close()


# A model.py that wraps the published one (renamed served_model.py) in the same folder:
# Triton imports the version folder as a package, so the wrapper imports its sibling.
WRAPPER = """
import os
import time

from . import served_model as _served
"""

GATED_MODEL = (
    WRAPPER
    + """

class TritonPythonModel(_served.TritonPythonModel):
    def execute(self, requests):
        deadline = time.monotonic() + 300  # a slow backend, bounded
        while os.path.exists(GATE) and time.monotonic() < deadline:
            time.sleep(0.02)
        return super().execute(requests)
"""
)


def _wrapped_repo(model_repo: Path, tmp_path: Path, model_py: str) -> tuple[ServerOptions, Path]:
    """A copy of the repository whose classifier runs ``model_py`` over the published
    model.py (renamed served_model.py), its behaviour switched by a gate file; server
    options on free ports for it."""
    from serve.runtime.handle import free_port

    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    gate = tmp_path / "gate"
    version = repo / "antsbees" / "1"
    (version / "model.py").rename(version / "served_model.py")
    (version / "model.py").write_text(f"GATE = {str(gate)!r}\n" + model_py)
    opts = ServerOptions(
        model_repository=str(repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    return opts, gate


def test_a_flood_beyond_the_queue_bound_is_rejected_fast(model_repo, tmp_path):
    """While the classifier cannot drain its queue (a slow backend), more requests than
    the front lets into Triton (``max_queue``, running or queued) are refused at once
    with a clear "server busy" error instead of piling up; once it drains, the queued
    ones are answered and the server stays ready.

    The queue bound lives at the public front, not in Triton: the published classifier
    config has no queue policy (in Triton 2.51 one makes the batcher sleep 500 ms with a
    request waiting; see test_no_stalls_*). The flood runs on a copy of the repository
    whose classifier blocks in ``execute`` while a gate file exists (the published
    model.py underneath), so what is refused does not depend on how fast a loaded client
    sends. (Pausing the stub with SIGSTOP instead crashed Triton 2.51's python backend
    once under load: boost lock_exception in ModelInstanceExecute.)"""
    from serve.runtime.limits import FrontLimits
    from serve.runtime.stack import PublicServer

    published = (model_repo / "antsbees" / "config.pbtxt").read_text()
    assert not parse_config(published).dynamic_batching.HasField("default_queue_policy")
    opts, gate = _wrapped_repo(model_repo, tmp_path, GATED_MODEL)
    limits = FrontLimits(max_queue=16)
    with PublicServer(opts, limits, log_path=tmp_path / "server.log") as server:
        _flood(server.grpc_url, limits.max_queue, gate)


def _small_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _flood(url: str, bound: int, gate: Path) -> None:
    """Small encoded images to the ``_image`` ensemble (whose classifier step blocks): a
    message that fits the front's buffer is refused with the front's own "server busy".
    (A refused 600 KB tensor reaches gRPC as RST_STREAM(CANCEL) instead, see
    serve.core.errors.BUSY_MARKERS, and one connection flooded with such bodies can hold up its
    own other streams in HAProxy 2.6's HTTP/2 demultiplexer.)"""
    n = bound + 40
    results: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    client = grpcclient.InferenceServerClient(url)

    def callback(result, error) -> None:
        with lock:
            results.append("ok" if error is None else str(error))
            if len(results) == n:
                done.set()

    def rejected() -> list[str]:
        with lock:
            return [r for r in results if r != "ok"]

    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[_small_jpeg()]], dtype=object))
    gate.touch()
    try:
        for _ in range(n):
            client.async_infer("antsbees_image", [inp], callback=callback)
        wait_until(lambda: len(rejected()) >= n - bound, 120, "the excess to be refused")
        with lock:
            assert "ok" not in results, "answered while the backend was blocked"
    finally:
        gate.unlink(missing_ok=True)
    try:
        assert done.wait(300), f"{len(results)} of {n} answered"
        errors = rejected()
        assert len(errors) == n - bound, (len(errors), set(errors))
        assert all("server busy" in e.lower() for e in errors), set(errors)
        assert results.count("ok") == bound
        assert client.is_server_ready() and client.is_model_ready("antsbees_image")
    finally:
        client.close()


def test_the_queue_is_bounded_in_bytes_too(model_repo, tmp_path):
    """Large requests (batches) have a byte budget of their own: with room for one, a
    second batch is refused as server busy while the first is inside Triton - on HTTP
    and gRPC - and single-image requests still get in; released, all are answered."""
    from serve.core.errors import classify_error
    from serve.runtime.limits import FrontLimits
    from serve.runtime.stack import PublicServer

    opts, gate = _wrapped_repo(model_repo, tmp_path, GATED_MODEL)
    # 16 requests of up to 1 MiB (one image each), and one batch (the rest of 32 MiB)
    limits = FrontLimits(max_queue=16, max_queue_bytes=32 << 20)
    batch = np.zeros((4, 3, 224, 224), np.float32)  # 2.4 MB: a large request
    single = np.zeros((1, 3, 224, 224), np.float32)
    results: dict[str, list[str]] = {"batch": [], "single": []}
    lock = threading.Lock()

    def send(module, url: str, x: np.ndarray, kind: str) -> None:
        client = module.InferenceServerClient(url)
        try:
            inp = module.InferInput(INPUT_NAME, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("antsbees", [inp])
            outcome = "ok"
        except InferenceServerException as e:
            err = classify_error(e, "infer", url, module.__name__.split(".")[-1], "antsbees")
            outcome = f"{type(err).__name__}: {e}"
        finally:
            client.close()
        with lock:
            results[kind].append(outcome)

    def inside(backend: str) -> int:
        rows = server.front_stats()
        return sum(
            int(r["scur"] or 0) for r in rows if r["pxname"] == backend and r["svname"] == "BACKEND"
        )

    with PublicServer(opts, limits, log_path=tmp_path / "server.log") as server:
        threads = []
        gate.touch()
        try:
            for module, url, backend in (
                (grpcclient, server.grpc_url, "triton_grpc_large"),
                (httpclient, server.http_url, "triton_http_large"),
            ):
                first = threading.Thread(target=send, args=(module, url, batch, "batch"))
                first.start()
                threads.append(first)
                wait_until(lambda b=backend: inside(b) == 1, 60, f"a batch inside ({backend})")
                send(module, url, batch, "batch")  # refused at once: no room for a second
                with lock:
                    refused = [r for r in results["batch"] if r != "ok"]
                assert len(refused) == 1 and refused[0].startswith("ServerBusy"), results
                for _ in range(3):  # single images still get in (they queue in Triton)
                    t = threading.Thread(target=send, args=(module, url, single, "single"))
                    t.start()
                    threads.append(t)
                wait_until(
                    lambda: inside("triton_grpc") + inside("triton_http") >= 3,
                    60,
                    "single-image requests inside Triton",
                )
                gate.unlink()
                for t in threads:
                    t.join(timeout=120)
                with lock:
                    assert results["single"] == ["ok"] * 3, results
                    assert results["batch"].count("ok") == 1, results
                    results["batch"].clear()
                    results["single"].clear()
                threads.clear()
                gate.touch()
        finally:
            gate.unlink(missing_ok=True)
            for t in threads:
                t.join(timeout=120)


SLOW_MODEL = (
    WRAPPER
    + """

class TritonPythonModel(_served.TritonPythonModel):
    def execute(self, requests):
        if os.path.exists(GATE):
            time.sleep(1.0)  # a slow backend: busy, but it finishes every request
        return super().execute(requests)
"""
)


def test_watchdog_leaves_a_busy_model_alone(model_repo, tmp_path):
    """A model that answers every request, slowly, under steady load: its probes time out,
    but it finished other requests meanwhile, so the watchdog does not restart it (a
    restart would drop the work in flight)."""
    from serve.runtime.triton_server import TritonServer

    opts, gate = _wrapped_repo(model_repo, tmp_path, SLOW_MODEL)
    with TritonServer(opts, log_path=tmp_path / "server.log") as server:
        stop = threading.Event()
        done: list[int] = []

        def load() -> None:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            inp = grpcclient.InferInput(INPUT_NAME, [1, 3, 224, 224], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
            try:
                while not stop.is_set():
                    client.infer("antsbees", [inp], client_timeout=120)
                    done.append(1)
            finally:
                client.close()

        gate.touch()
        workers = [threading.Thread(target=load) for _ in range(3)]
        [w.start() for w in workers]
        try:
            wait_until(lambda: len(done) >= 3, 120, "the slow model to answer")
            dog = Watchdog(
                WatchdogConfig(
                    url=server.grpc_url, timeout=0.3, hung_rounds=1, admin_key=server.admin_key
                ),
                log_fn=lambda m: None,
            )
            rounds = [dog.check_once() for _ in range(2)]
        finally:
            stop.set()
            gate.unlink(missing_ok=True)
            [w.join(timeout=120) for w in workers]
        assert any("antsbees:1" in r.timed_out for r in rounds), rounds  # it was slow
        assert not any(r.restarted for r in rounds), rounds  # and left alone


def test_one_client_gets_at_most_its_concurrency_share(model_repo, tmp_path):
    """``--max-per-client``: the front counts one address's requests in flight (HTTP/2
    streams of one connection too); over the share they are refused at once with a clear
    error while the others are answered, so one client cannot take the whole queue."""
    from serve.runtime.limits import FrontLimits
    from serve.runtime.stack import PublicServer

    opts, gate = _wrapped_repo(model_repo, tmp_path, GATED_MODEL)
    results: list[str] = []
    lock = threading.Lock()
    with PublicServer(opts, FrontLimits(max_per_client=2), log_path=tmp_path / "s.log") as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[_small_jpeg()]], dtype=object))

        def callback(result, error) -> None:
            with lock:
                results.append("ok" if error is None else str(error))

        gate.touch()
        try:
            for _ in range(6):
                client.async_infer("antsbees_image", [inp], callback=callback)
            wait_until(lambda: len(results) >= 4, 120, "the excess to be refused")
        finally:
            gate.unlink(missing_ok=True)
        wait_until(lambda: len(results) == 6, 300, "every request to be answered")
        client.close()
    refused = [r for r in results if r != "ok"]
    assert results.count("ok") == 2, results
    assert all("too many concurrent requests from this client" in r for r in refused), refused
