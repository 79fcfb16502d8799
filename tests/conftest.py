"""Shared fixtures: real data, one short real training run, its export, a real Triton server.

Everything runs the real components: PyTorch training on the ants/bees images,
ONNX export + ONNX Runtime, and the tritonserver binary on loopback ports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
HYMENOPTERA = Path(os.environ.get("TEST_DATA", SHARED / "hymenoptera_data"))
PY = sys.executable
# `make export` looks for a live server on 127.0.0.1:$GRPC_PORT to deploy to; keep the
# tests away from any server a developer is running (port 9 is closed). Tests that want
# that behaviour pass --server-url / start their own server on free ports.
os.environ["GRPC_PORT"] = "9"

# A closed local port as HTTPS proxy: every download fails at once, as it does offline.
OFFLINE_ENV = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` from the repo root, capturing output."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [PY, "-m", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"python -m {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


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
    """`python -m export` of the trained run into a fresh model repository."""
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
    """The real tritonserver on free loopback ports, stopped by PID afterwards."""
    from serve.triton_server import ServerOptions, TritonServer, free_port

    opts = ServerOptions(
        model_repository=str(model_repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    log = tmp_path_factory.mktemp("triton") / "server.log"
    srv = TritonServer(opts, log_path=log).start()
    yield srv
    code = srv.stop()
    assert code == 0, f"tritonserver exited {code} on SIGTERM; log: {log}"
