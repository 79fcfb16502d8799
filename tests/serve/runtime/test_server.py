"""Serving: the real tritonserver on loopback, HTTP and gRPC, the classify CLI, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serve.backend.preprocess import ResizeCrop, preprocess
from serve.client.client import Classifier
from serve.core.errors import ServerUnavailable
from serve.runtime.handle import free_port
from tests.helpers import ROOT, child_pids, process_alive, run_cli

GEOMETRY = ResizeCrop(256, 224)


@pytest.fixture(scope="module")
def val_pixels(val_images: list[Path]) -> tuple[list[Path], np.ndarray]:
    paths = val_images[::8]  # 20 images, both classes
    return paths, np.stack([preprocess(p, GEOMETRY) for p in paths])


@pytest.fixture(scope="module")
def ort_logits(trained_run: Path, val_pixels) -> np.ndarray:
    session = ort.InferenceSession(
        str(trained_run / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"input": val_pixels[1]})[0]


def _infer(module, url: str, x: np.ndarray, **output_kwargs) -> np.ndarray:
    client = module.InferenceServerClient(url)
    try:
        inp = module.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = module.InferRequestedOutput("logits", **output_kwargs)
        return client.infer("antsbees", [inp], outputs=[out]).as_numpy("logits")
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_logits_bit_identical_to_onnxruntime(
    server, val_pixels, ort_logits, protocol
) -> None:
    module, url = (
        (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    )
    served = _infer(module, url, val_pixels[1])
    assert served.dtype == np.float32 and served.shape == ort_logits.shape
    assert np.array_equal(served, ort_logits)
    # Predictions vary across images: the comparison is not of a constant function.
    assert len(set(served.argmax(1).tolist())) == 2


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classification_extension_returns_labels(server, val_pixels, ort_logits, protocol) -> None:
    module, url = (
        (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    )
    entries = _infer(module, url, val_pixels[1][:4], class_count=2)
    for row, logits in zip(entries, ort_logits[:4], strict=True):
        score, index, label = row[0].decode().split(":")
        assert int(index) == int(logits.argmax())
        assert label == ["ants", "bees"][int(index)]
        assert float(score) == pytest.approx(float(logits.max()), abs=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classifier_client_top_k(server, val_pixels, ort_logits, protocol) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    paths, _ = val_pixels
    with Classifier(url, "antsbees", protocol=protocol) as clf:
        results = clf.classify(paths, top_k=2)
    assert len(results) == len(paths)
    for preds, logits in zip(results, ort_logits, strict=True):
        assert [p.label for p in preds][0] == ["ants", "bees"][int(logits.argmax())]
        assert {p.label for p in preds} == {"ants", "bees"}
        assert sum(p.probability for p in preds) == pytest.approx(1.0, abs=1e-6)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert preds[0].probability == pytest.approx(float(expected.max()), abs=1e-5)


@pytest.mark.parametrize("transport", ["body", "shared-memory"])
def test_classify_cli_on_real_images_and_a_corrupt_one(
    server, val_pixels, ort_logits, tmp_path: Path, transport: str
) -> None:
    paths, _ = val_pixels
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(paths[0].read_bytes()[:200])  # a truncated JPEG
    proc = run_cli(
        "serve",
        "classify",
        "--model",
        "antsbees",
        "--url",
        server.http_url,
        "--protocol",
        "http",
        "--top-k",
        "2",
        str(paths[0]),
        str(corrupt),
        str(paths[-1]),
        *(["--shared-memory"] if transport == "shared-memory" else []),
        check=False,
    )
    assert proc.returncode == 1  # one image failed, the others were answered
    assert "corrupt.jpg" in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, logits in zip(lines, (ort_logits[0], ort_logits[-1]), strict=True):
        top_label = line.split(": ", 1)[1].split()[0]
        assert top_label == ["ants", "bees"][int(logits.argmax())]
    assert server.is_ready()


def test_wrong_inputs_get_errors_and_server_stays_ready(server, val_pixels, ort_logits) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        bad_cases = [
            np.zeros((1, 3, 100, 100), np.float32),  # wrong shape
            np.zeros((1, 224, 224, 3), np.float32),  # NHWC instead of NCHW
        ]
        for x in bad_cases:
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException, match="unexpected shape"):
                client.infer("antsbees", [inp])
        x64 = np.zeros((1, 3, 224, 224), np.float64)
        inp = grpcclient.InferInput("input", list(x64.shape), "FP64")
        inp.set_data_from_numpy(x64)
        with pytest.raises(InferenceServerException, match="FP64|data-type|datatype"):
            client.infer("antsbees", [inp])
        nan = np.full((1, 3, 224, 224), np.nan, np.float32)
        inp = grpcclient.InferInput("input", list(nan.shape), "FP32")
        inp.set_data_from_numpy(nan)
        with pytest.raises(InferenceServerException, match="NaN"):
            client.infer("antsbees", [inp])
        assert client.is_server_ready() and client.is_model_ready("antsbees")
    finally:
        client.close()
    good = _infer(httpclient, server.http_url, val_pixels[1][:1])
    assert np.array_equal(good, ort_logits[:1])


def test_metrics_endpoint_counts_requests(server, val_pixels) -> None:
    _infer(grpcclient, server.grpc_url, val_pixels[1][:2])
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("nv_inference_request_success") and 'model="antsbees"' in ln
    ]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 1


def test_client_reports_server_down() -> None:
    port = free_port()
    for protocol in ("http", "grpc"):
        with pytest.raises(ServerUnavailable, match=str(port)):
            Classifier(f"127.0.0.1:{port}", "antsbees", protocol=protocol, timeout=5)
    proc = run_cli(
        "serve", "classify", "--url", f"127.0.0.1:{port}", str(ROOT / "README.md"), check=False
    )
    assert proc.returncode == 2 and "no Triton server" in proc.stderr


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"server never became ready at {url}")


def _serve(cmd: list[str], model_repo: Path) -> tuple[subprocess.Popen, dict[str, int], str]:
    ports = {"HTTP_PORT": free_port(), "GRPC_PORT": free_port(), "METRICS_PORT": free_port()}
    # Ports and repository travel as environment variables: make's `?=` and `serve run`
    # both read HTTP_PORT / GRPC_PORT / METRICS_PORT (and make reads REPO).
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            **{k: str(v) for k, v in ports.items()},
            "MAKEFLAGS": "",
            "REPO": str(model_repo),
        },
    )
    url = f"http://127.0.0.1:{ports['HTTP_PORT']}/v2/models/antsbees/ready"
    return proc, ports, url


def _tritonserver_under(pid: int) -> int:
    """The tritonserver process among ``pid`` and its descendants (exactly one)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if Path(f"/proc/{p}/exe").resolve().name == "tritonserver":
            found.append(p)
        todo += child_pids(p)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    "flags",
    [["--watchdog", "10"], ["--watchdog", "0"], ["--watchdog", "0", "--no-front"]],
    ids=["front+watchdog", "front", "no-front-exec"],
)
def test_serve_run_stops_cleanly_on_sigterm(model_repo: Path, flags: list[str]) -> None:
    cmd = [os.sys.executable, "-m", "serve", "run", "--model-repository", str(model_repo)]
    proc, ports, url = _serve([*cmd, *flags], model_repo)
    try:
        _wait_ready(url, proc)
        server_pid = _tritonserver_under(proc.pid)
        # --no-front --watchdog 0 execs tritonserver; otherwise `serve run` supervises the
        # stack (the front and tritonserver) as children.
        assert (server_pid == proc.pid) == ("--no-front" in flags)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0  # the server's own exit code
        assert not process_alive(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert "successfully unloaded 'antsbees'" in output
    # Triton's own log names its private ports; behind the front each such line says
    # which public port clients use instead
    started = [ln for ln in output.splitlines() if "Started GRPCInferenceService at" in ln]
    assert started, output[-2000:]
    if "--no-front" not in flags:
        assert f"clients use gRPC 127.0.0.1:{ports['GRPC_PORT']})" in started[0], started


def test_make_serve_in_foreground_stops_on_sigterm(model_repo: Path) -> None:
    proc, _, url = _serve(["make", "--no-print-directory", "serve"], model_repo)
    try:
        _wait_ready(url, proc)
        (child,) = child_pids(proc.pid)  # make execs nothing itself: one recipe process
        server_pid = _tritonserver_under(child)
        proc.send_signal(signal.SIGTERM)  # make passes it on; the supervisor stops the server
        proc.wait(timeout=90)  # the bound: Triton's exit timeout (10 s) + the kill (20 s later)
        deadline = time.monotonic() + 30
        while (process_alive(server_pid) or process_alive(child)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(server_pid) and not process_alive(child)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "successfully unloaded 'antsbees'" in proc.stdout.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_stock_image_client_contract(server, val_images: list[Path]) -> None:
    """What Triton's stock image_client.py checks and sends, asked over gRPC: one input with
    3 dims + batch in FORMAT_NCHW, one FP32 vector output, classification with labels."""
    from PIL import Image

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        meta = client.get_model_metadata("antsbees")
        config = client.get_model_config("antsbees").config
        assert len(meta.inputs) == len(meta.outputs) == len(config.input) == 1
        assert meta.outputs[0].datatype == "FP32" and list(meta.outputs[0].shape) == [-1, 2]
        assert config.max_batch_size > 0 and len(meta.inputs[0].shape) == 4
        assert config.input[0].format == config.input[0].FORMAT_NCHW
        # image_client: RGB, plain resize to (w, h), float, scaling NONE, CHW, batch of 2.
        imgs = [
            Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR) for p in val_images[:2]
        ]
        x = np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) for im in imgs])
        inp = grpcclient.InferInput(meta.inputs[0].name, list(x.shape), meta.inputs[0].datatype)
        inp.set_data_from_numpy(x)
        out = grpcclient.InferRequestedOutput(meta.outputs[0].name, class_count=1)
        result = client.infer("antsbees", [inp], outputs=[out]).as_numpy("logits")
        assert result.shape == (2, 1)
        assert all(r[0].decode().split(":")[2] in ("ants", "bees") for r in result)
    finally:
        client.close()


@pytest.mark.server
def test_start_then_with_runs_one_server_and_cleans_up(tmp_path: Path) -> None:
    """`with TritonServer(opts).start() as srv:` starts one server (a second start is a
    no-op, not a second process on the same ports that leaks the first); leaving the block
    stops it and removes its admin key files."""
    from serve.core import auth
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.triton_server import TritonServer

    (tmp_path / "repo").mkdir()
    opts = ServerOptions(
        model_repository=str(tmp_path / "repo"),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    with TritonServer(opts, log_path=tmp_path / "server.log").start() as srv:
        pid = srv.pid
        assert srv.start() is srv and srv.pid == pid
        key_files = [auth.key_path(u) for u in opts.urls]
        assert all(p.is_file() for p in key_files)
        assert srv.is_ready()
    assert not process_alive(pid)
    assert not any(p.exists() for p in key_files)
