"""Helpers every test module shares: paths, running the stages' CLIs, processes, waiting
on conditions with deadlines (never on bare sleeps)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
HYMENOPTERA = Path(os.environ.get("TEST_DATA", SHARED / "hymenoptera_data"))
CIFAR = SHARED / "cifar10"
PY = sys.executable

# A closed local port as HTTPS proxy: every download fails at once, as it does offline.
OFFLINE_ENV = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}

T = TypeVar("T")


def example_card(**overrides: Any) -> Any:
    """A valid two-class ``ModelCard`` (ResNet-18 geometry, ImageNet mean/std) for tests
    that need a card but no trained model; ``overrides`` go to ``ModelCard.create``."""
    from serve.core.card import ModelCard

    fields: dict[str, Any] = {
        "name": "m",
        "arch": "resnet18",
        "classes": ["ants", "bees"],
        "resize": 256,
        "crop": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    return ModelCard.create(**{**fields, **overrides})


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


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy or an array (returned) or
    ``timeout`` seconds pass (AssertionError naming ``what``). Exceptions count as "not
    yet"; the last one is reported."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = condition()
            if isinstance(value, np.ndarray) or value:
                return value
        except Exception as e:  # noqa: BLE001 - not yet
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}"
                + (f" (last error: {type(last).__name__}: {last})" if last else "")
            )
        time.sleep(interval)


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


def stub_pids(server_pid: int) -> list[int]:
    """The python-backend stub processes of a tritonserver."""
    out = []
    for p in child_pids(server_pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in cmd:
            out.append(p)
    return out


def expensive_jpeg(side: int = 6000, scans: int = 40) -> bytes:
    """A small (~0.2 MB) but expensive JPEG within the served limits: a flat ``side`` x
    ``side`` progressive image whose last scan is repeated up to ``scans`` scans (6000 px,
    40 scans: 2.2 s to decode on the 2 vCPU AMD EPYC here)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    extra = max(0, scans - data.count(b"\xff\xda"))
    return data[:end] + data[last:end] * extra + data[end:]
