"""Shared fixtures: real data, one short real training run, its export, a real Triton server.

Everything runs the real components: PyTorch training on the ants/bees images,
ONNX export + ONNX Runtime, and the tritonserver binary on loopback ports.

Markers are applied here from what a test uses, so none is forgotten: ``server`` for
every test that (through its fixtures) starts a tritonserver, ``slow`` for every test
that trains or exports. ``make test-fast`` runs the rest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import HYMENOPTERA, OFFLINE_ENV, run_cli

# Admin keys of the servers the tests start go to a private folder, not the user's.
os.environ.setdefault("TRAINSERVE_KEY_DIR", "/tmp/trainserve-test-keys-" + str(os.getuid()))
os.environ.pop("TRAINSERVE_ADMIN_KEY", None)
# Exports of the same checkpoint share their ONNX graph through one cache per test run
# (fresh each run, never the user's ~/.cache); parity still runs on every export.
ONNX_CACHE = tempfile.mkdtemp(prefix="trainserve-test-onnx-")
os.environ["TRAINSERVE_ONNX_CACHE"] = ONNX_CACHE

SERVER_FIXTURES = {"model_repo", "server", "own_server"}
SLOW_FIXTURES = {"trained_run"}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(ONNX_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
        if names & (SERVER_FIXTURES | SLOW_FIXTURES) or item.get_closest_marker("server"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not (HYMENOPTERA / "train").is_dir():
        pytest.fail(
            f"test data missing: {HYMENOPTERA} (expected ../shared/data beside the "
            "checkout, or TEST_DATA=<ImageFolder root>; `make data` downloads it)"
        )
    return HYMENOPTERA


@pytest.fixture(scope="session")
def val_images(hymenoptera: Path) -> list[Path]:
    return sorted(p for p in (hymenoptera / "val").rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, hymenoptera: Path) -> Path:
    """`python -m train` with the defaults a user gets offline (ARCH=resnet18,
    PRETRAINED=auto -> offline backbone), feature-extract, 1 epoch on all real images."""
    out = tmp_path_factory.mktemp("run") / "antsbees"
    run_cli(
        "train",
        "--model",
        "antsbees",
        "--data",
        str(hymenoptera),
        "--out",
        str(out),
        "--mode",
        "feature-extract",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--download-timeout",
        "5",
        env={**OFFLINE_ENV, "TORCH_HOME": str(out.parent / "th")},
    )
    return out


@pytest.fixture(scope="session")
def model_repo(
    tmp_path_factory: pytest.TempPathFactory, trained_run: Path, hymenoptera: Path
) -> Path:
    """`python -m export` of the trained run into a fresh model repository (its Triton
    parity stages start a server)."""
    repo = tmp_path_factory.mktemp("model_repository")
    run_cli(
        "export",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--name",
        "antsbees",
        "--data",
        str(hymenoptera),
        "--model-repository",
        str(repo),
    )
    return repo


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """What ``serve run`` serves, on free loopback ports: the HAProxy front on the public
    ports, the real tritonserver private behind it; stopped by PID afterwards."""
    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.stack import PublicServer

    opts = ServerOptions(
        model_repository=str(model_repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    log = tmp_path_factory.mktemp("triton") / "server.log"
    srv = PublicServer(opts, log_path=log).start()
    yield srv
    code = srv.stop()
    assert code == 0, f"the server stack exited {code} on SIGTERM; log: {log}"


@pytest.fixture
def own_server(model_repo: Path, tmp_path: Path):
    """A server of its own, for tests that kill or restart things. Its shutdown grace is
    3 s, not 10: with a stub killed or stopped, Triton waits out the whole grace."""
    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.triton_server import TritonServer

    opts = ServerOptions(
        model_repository=str(model_repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout=3,
    )
    srv = TritonServer(opts, log_path=tmp_path / "server.log").start()
    yield srv
    srv.stop()
