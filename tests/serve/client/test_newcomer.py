"""What a new user hits with the clients and operations commands - custom ports,
a wrong protocol or URL form, a model that does not exist."""

from __future__ import annotations

import pytest

from serve.core import auth
from tests.helpers import run_cli


def _serve(*args: str):
    return run_cli("serve", *args, check=False, timeout=120)


def test_health_finds_the_metrics_port_of_a_server_on_other_ports(server, val_images):
    """``serve health --url HOST:PORT`` reads the metrics of *that* server (``serve run``
    records where they are), over gRPC or HTTP, instead of :8002's zeros."""
    out = _serve("classify", "--model", "antsbees", "--url", server.grpc_url, str(val_images[0]))
    assert out.returncode == 0, out.stderr
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        h = _serve("health", "--url", url, "--protocol", protocol)
        assert h.returncode == 0, h.stderr
        row = next(line for line in h.stdout.splitlines() if line.startswith("antsbees "))
        ok = float(row.split()[3])
        assert ok >= 1, h.stdout
        m = _serve("models", "--url", url, "--protocol", protocol)
        assert m.returncode == 0 and "antsbees_image" in m.stdout, m.stderr


def test_metrics_url_is_unknown_rather_than_guessed():
    assert auth.metrics_url("127.0.0.1:8001") == "http://127.0.0.1:8002/metrics"
    assert auth.metrics_url("10.1.2.3:9999") is None  # no record, not the default ports


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--protocol", "http", "--url", "GRPC"], "gRPC port"),
        # the front answers a gRPC call at its HTTP or metrics port with the right ports
        (["--protocol", "grpc", "--url", "HTTP"], "this is the HTTP/REST port, not gRPC"),
        (["--protocol", "grpc", "--url", "METRICS"], "this is the metrics port, not gRPC"),
        (["--protocol", "http", "--url", "METRICS"], "this is the metrics port"),
        (["--url", "http://HTTP"], "HOST:PORT, not a URL"),
        # through the front, which names the models it serves
        (["--model", "no_such_model"], "public models: antsbees, antsbees_image"),
    ],
    ids=[
        "http-to-grpc-port",
        "grpc-to-http-port",
        "grpc-to-metrics-port",
        "http-to-metrics-port",
        "url-with-scheme",
        "unknown-model",
    ],
)
def test_client_errors_name_the_mistake(server, val_images, args, expected):
    """One clear line, exit 1, no traceback; a wrong port's answer names the right ones."""
    metrics = server.metrics_url.split("//", 1)[1].split("/", 1)[0]
    args = [a.replace("GRPC", server.grpc_url).replace("HTTP", server.http_url) for a in args]
    args = [a.replace("METRICS", metrics) for a in args]
    if "--url" not in args:
        args += ["--url", server.grpc_url]
    if "--model" not in args:
        args += ["--model", "antsbees"]
    out = _serve("classify", *args, str(val_images[0]))
    assert out.returncode != 0
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    if "this is the" in expected:
        port = server.grpc_url.rsplit(":", 1)[1]
        assert f"gRPC on port {port}" in out.stderr, out.stderr


def test_a_model_that_does_not_exist_is_named_so(own_server, val_images):
    """Straight to tritonserver (no front): 'does not exist' and the models that do, not
    'not ready'."""
    out = _serve(
        "classify", "--model", "no_such_model", "--url", own_server.grpc_url, str(val_images[0])
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "does not exist (models here: antsbees, antsbees_image" in out.stderr, out.stderr
