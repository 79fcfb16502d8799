"""The raw-image endpoint (ensemble), versions and rollout on a live server,
the client library (sync and async), health, and served accuracy."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from serve.backend.preprocess import ImageError, ResizeCrop, preprocess
from serve.client import admin
from serve.client.async_classifier import AsyncClassifier
from serve.client.client import Classifier
from serve.core.card import ModelCard
from serve.core.errors import ModelNotReady
from serve.runtime.handle import free_port
from serve.runtime.server_options import ServerOptions
from serve.runtime.triton_server import TritonServer
from tests.helpers import run_cli, wait_until

GEOMETRY = ResizeCrop(256, 224)


@pytest.fixture(scope="module")
def in_process(trained_run: Path):
    session = ort.InferenceSession(
        str(trained_run / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def logits(sources) -> np.ndarray:
        x = np.stack([preprocess(s, GEOMETRY) for s in sources])
        return session.run(None, {"input": x})[0]

    return logits


def test_raw_endpoint_equals_in_process_on_every_val_image(server, val_images, in_process):
    with Classifier(server.grpc_url, "antsbees_image") as clf:
        assert clf.info.raw and clf.info.input_name == "IMAGE"
        served = clf.logits(np.array([[p.read_bytes()] for p in val_images], dtype=object))
    expected = in_process(val_images)
    assert served.shape == (153, 2)
    assert (served.argmax(1) == expected.argmax(1)).all()
    assert np.abs(served - expected).max() == 0.0  # same decoder, same pixels, same model


def _formats() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (180, 260, 3), dtype=np.uint8))
    made: dict[str, bytes] = {}

    def save(name: str, im: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        made[name] = buf.getvalue()

    save("rgb.jpg", base, "JPEG", quality=90)
    save("cmyk.jpg", base.convert("CMYK"), "JPEG")
    save("gray.png", base.convert("L"), "PNG")
    save("la.png", base.convert("LA"), "PNG")
    save("rgba.png", base.convert("RGBA"), "PNG")
    save("palette.gif", base.convert("P"), "GIF")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    save("palette-transparent.png", pal, "PNG", transparency=0)
    save("bw.bmp", base.convert("1"), "BMP")
    save("i16.png", Image.fromarray(rng.integers(0, 65535, (180, 260), dtype=np.uint16)), "PNG")
    save("rgb.tiff", base, "TIFF")
    save("rgb.webp", base, "WEBP", lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", base, "JPEG", exif=exif)
    return made


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_pillow_mode_through_the_raw_endpoint(server, in_process, protocol):
    images = _formats()
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with Classifier(url, "antsbees_image", protocol=protocol) as clf:
        served = clf.logits(np.array([[b] for b in images.values()], dtype=object))
    np.testing.assert_array_equal(served, in_process(list(images.values())))


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buf, "PNG")  # 48 MP of zeros: a few KB
    return buf.getvalue()


def test_bad_items_fail_alone_in_a_dynamic_batch(server, val_images):
    good = val_images[0].read_bytes()
    cases = {
        "not an image": b"this is text",
        "truncated": good[: len(good) // 3],
        "empty": b"",
        "over the pixel limit": _bomb(),
    }
    expected_msg = {
        "not an image": "not a readable image",
        "truncated": "image",
        "empty": "empty input",
        "over the pixel limit": "40 MP limit",
    }
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: dict[str, object] = {}
    done = threading.Event()
    pending = [0]
    lock = threading.Lock()

    def callback(key, result, error):
        with lock:
            results[key] = error if error is not None else result.as_numpy("logits")
            pending[0] -= 1
            if pending[0] == 0:
                done.set()

    requests = [("good-a", good), *cases.items(), ("good-b", val_images[-1].read_bytes())]
    pending[0] = len(requests)
    try:
        for key, payload in requests:  # all in flight at once: one dynamic batch or a few
            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[payload]], dtype=object))
            client.async_infer(
                "antsbees_image",
                [inp],
                callback=lambda result, error, k=key: callback(k, result, error),
            )
        assert done.wait(60)
        for key in ("good-a", "good-b"):
            assert isinstance(results[key], np.ndarray) and results[key].shape == (1, 2)
        for key, msg in expected_msg.items():
            err = results[key]
            assert not isinstance(err, np.ndarray), key
            assert "bad image" in str(err) and msg in str(err), (key, str(err))
        assert client.is_server_ready() and client.is_model_ready("antsbees_image")
    finally:
        client.close()


def test_client_errors_are_typed(server):
    with pytest.raises(ModelNotReady, match="no_such_model"):
        Classifier(server.grpc_url, "no_such_model")
    with Classifier(server.grpc_url, "antsbees_image") as clf:
        # the server's decode failure is an ImageError, as a local decode's: its reason,
        # not the ensemble's "[StatusCode.INTERNAL] in ensemble ..." wrapping
        with pytest.raises(ImageError, match="not a readable image") as bad:
            clf.classify([b"garbage bytes"])
        assert "ensemble" not in str(bad.value) and "StatusCode" not in str(bad.value)
        out = clf.classify_each([b"garbage", b""], top_k=1)
        assert all(isinstance(r, ImageError) for r in out), out


def test_async_classifier_many_in_flight(server, val_images):
    paths = val_images[::10]

    async def main():
        clf = await AsyncClassifier.create(server.grpc_url, "antsbees_image")
        try:
            return await asyncio.gather(*(clf.classify([p], top_k=2) for p in paths))
        finally:
            await clf.close()

    results = asyncio.run(main())
    with Classifier(server.grpc_url, "antsbees_image") as clf:
        expected = clf.classify(paths, top_k=2)
    assert [r[0][0].label for r in results] == [e[0].label for e in expected]
    assert [r[0][0].probability for r in results] == pytest.approx(
        [e[0].probability for e in expected], abs=1e-6
    )


def test_classify_cli_raw_and_pixels_agree(server, val_images):
    paths = [str(p) for p in val_images[:3]]
    raw = run_cli("serve", "classify", "--raw", "--url", server.grpc_url, "--json", *paths)
    pix = run_cli("serve", "classify", "--url", server.grpc_url, "--json", *paths)
    raw_rows = [json.loads(x) for x in raw.stdout.splitlines()]
    pix_rows = [json.loads(x) for x in pix.stdout.splitlines()]
    assert [r["model"] for r in raw_rows] == ["antsbees_image"] * 3
    for r, p in zip(raw_rows, pix_rows, strict=True):
        assert r["predictions"][0]["label"] == p["predictions"][0]["label"]
        assert r["predictions"][0]["probability"] == pytest.approx(
            p["predictions"][0]["probability"], abs=1e-6
        )


def test_served_accuracy_equals_in_process(server, trained_run, hymenoptera, tmp_path):
    png = tmp_path / "confusion.png"
    served = run_cli(
        "serve",
        "evaluate",
        "--model",
        "antsbees_image",
        "--data",
        str(hymenoptera / "val"),
        "--url",
        server.http_url,
        "--protocol",
        "http",
        "--confusion",
        str(png),
    )
    local = run_cli(
        "train",
        "evaluate",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--data",
        str(hymenoptera),
    )
    assert served.stdout.splitlines()[-1] == local.stdout.splitlines()[-1]
    assert served.stdout.splitlines()[-1].startswith("top-1: ")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_health_reports_readiness_and_metrics(server, val_images):
    with Classifier(server.grpc_url, "antsbees_image") as clf:
        clf.classify(val_images[:4])
    proc = run_cli(
        "serve", "health", "--url", server.grpc_url, "--metrics-url", server.metrics_url, "--json"
    )
    h = json.loads(proc.stdout)
    assert h["live"] and h["ready"]
    rows = {(m["model"], m["version"]): m for m in h["models"]}
    clf_row = rows[("antsbees", "1")]
    assert clf_row["state"] == "READY" and clf_row["success"] >= 4
    assert clf_row["avg_batch"] >= 1 and clf_row["avg_compute_ms"] > 0
    assert ("antsbees_image", "1") in rows and ("antsbees_preprocess", "1") in rows
    text = run_cli(
        "serve", "health", "--url", server.grpc_url, "--metrics-url", server.metrics_url
    ).stdout
    assert "server live: True  ready: True" in text and "avg batch" in text


@pytest.mark.long
def test_publish_while_serving_then_rollback(model_repo, trained_run, hymenoptera, tmp_path):
    """Version 2 is published and loaded while a client keeps sending requests; none
    fails; both versions serve (policy: latest 2), clients can pin one; rollback serves
    version 1 alone and `load` restores the policy."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    opts = ServerOptions(
        model_repository=str(repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    image = (
        hymenoptera
        / "val"
        / "ants"
        / sorted(p.name for p in (hymenoptera / "val" / "ants").iterdir())[0]
    )
    with TritonServer(opts, log_path=tmp_path / "server.log") as srv:
        stop, failures, count = threading.Event(), [], [0]

        def traffic():
            with Classifier(srv.grpc_url, "antsbees_image") as clf:
                while not stop.is_set():
                    try:
                        clf.classify([image])
                        count[0] += 1
                    except Exception as e:  # noqa: BLE001 - recorded and asserted on
                        failures.append(repr(e))
                    time.sleep(0.02)

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            proc = run_cli(
                "export",
                "--checkpoint",
                str(trained_run / "checkpoint.pt"),
                "--model-repository",
                str(repo),
                "--out-dir",
                str(tmp_path / "out"),
                "--advisory-sample",
                "8",
                "--no-int8-stage",  # publishing under traffic is the point, not INT8
                "--no-triton-parity",
                "--deploy",
                srv.grpc_url,
            )
        finally:
            seen = count[0]  # a few more requests after the deploy, then stop
            wait_until(lambda: count[0] >= seen + 5 or failures, 60, "requests after deploy")
            stop.set()
            worker.join(30)
        assert not failures and count[0] > 10, (failures[:3], count[0])
        assert "served accuracy" in proc.stderr
        card = ModelCard.from_dict(
            json.loads((repo / "antsbees" / "2" / "model_card.json").read_text())
        )
        assert card.served is not None
        assert card.served["status"] == "measured" and card.served["version"] == 2
        assert card.served["equal_to_in_process"] is True
        assert admin.ready_versions(srv.grpc_url, "antsbees") == [1, 2]
        listing = run_cli("serve", "models", "--url", srv.grpc_url).stdout
        assert "antsbees_image" in listing and "READY" in listing
        for version in ("1", "2"):  # clients may pin a version
            out = run_cli(
                "serve", "classify", "--url", srv.grpc_url, "--version", version, str(image)
            )
            assert out.stdout.startswith(str(image))
        proc = run_cli("serve", "rollback", "antsbees", "--url", srv.grpc_url)
        assert "version 2 -> 1" in proc.stdout
        assert admin.ready_versions(srv.grpc_url, "antsbees") == [1]
        with Classifier(srv.grpc_url, "antsbees_image") as clf:  # the ensemble follows
            assert clf.classify([image])[0][0].label in ("ants", "bees")
        run_cli("serve", "load", "antsbees", "--url", srv.grpc_url)
        assert admin.ready_versions(srv.grpc_url, "antsbees") == [1, 2]
        run_cli("serve", "unload", "antsbees_image", "--url", srv.grpc_url)
        with pytest.raises(ModelNotReady):
            Classifier(srv.grpc_url, "antsbees_image")


def test_publishing_is_atomic_for_a_polling_reader(model_repo, trained_run, tmp_path):
    """While export publishes, the version folders a server would see are always whole."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    seen_partial, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for v in (repo / "antsbees").iterdir():
                if v.name.isdigit():
                    names = {p.name for p in v.iterdir()}
                    if not {"model.onnx", "model.py", "model_card.json"} <= names:
                        seen_partial.append(sorted(names))

    t = threading.Thread(target=watch)
    t.start()
    try:
        run_cli(
            "export",
            "--checkpoint",
            str(trained_run / "checkpoint.pt"),
            "--model-repository",
            str(repo),
            "--out-dir",
            str(tmp_path / "out"),
            "--parity-limit",
            "16",
            "--advisory-sample",
            "8",
            "--no-int8-stage",
            "--no-triton-parity",
        )
    finally:
        stop.set()
        t.join()
    assert not seen_partial
    assert (repo / "antsbees" / "2" / "model.onnx").is_file()
