"""Heal models whose python-backend stub process died.

Measured on Triton 2.51: when a python-backend stub dies (OOM kill, segfault in a
native library, ``kill -9``), Triton keeps the model READY but every request to it
fails with "Stub process '<model>_0_0' is not healthy" - Triton never restarts it.
The watchdog probes every loaded version of every non-ensemble model with one tiny
valid request, and restarts (unload + load) a model whose probe reports a dead stub.
Ensembles that used a restarted model are loaded again if the unload took them down.

Only stub failures trigger a restart: a probe that fails for any other reason is
reported, not acted on. Runs inside ``python -m serve run`` (``--watchdog SECONDS``)
or against any server with ``python -m serve watchdog --url HOST:PORT``; no torch.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve import admin
from serve.client import DEFAULT_URLS

# What Triton's python backend answers once an instance's stub process is gone.
DEAD_STUB_MARKERS = ("is not healthy", "stub process is not")


@dataclass
class WatchdogConfig:
    """How often and how patiently to probe."""

    url: str = DEFAULT_URLS["grpc"]
    interval: float = 10.0  # seconds between rounds
    timeout: float = 30.0  # per probe request (a busy server queues it behind real work)


@dataclass
class Round:
    """What one round of probes found and did."""

    probed: list[str] = field(default_factory=list)  # "model:version"
    restarted: list[str] = field(default_factory=list)
    reloaded_ensembles: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # "model:version" -> message


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (127, 127, 127)).save(buf, format="PNG")
    return buf.getvalue()


def probe_inputs(metadata: dict[str, Any], grpcclient: Any) -> list[Any]:
    """One valid request for a model, built from its metadata: zeros for tensors (every
    variable dimension, the batch included, set to 1) and a small PNG for BYTES inputs."""
    inputs = []
    for spec in metadata.get("inputs", []):
        shape = [1 if int(d) < 0 else int(d) for d in spec["shape"]]
        inp = grpcclient.InferInput(spec["name"], shape, spec["datatype"])
        if spec["datatype"] == "BYTES":
            data = np.full(shape, _tiny_png(), dtype=object)
        else:
            from tritonclient.utils import triton_to_np_dtype

            data = np.zeros(shape, dtype=triton_to_np_dtype(spec["datatype"]))
        inp.set_data_from_numpy(data)
        inputs.append(inp)
    return inputs


def is_dead_stub(message: str) -> bool:
    """True for the python backend's "stub process is not healthy" errors."""
    text = message.lower()
    return any(m in text for m in DEAD_STUB_MARKERS)


def check_once(cfg: WatchdogConfig, log: Callable[[str], None] = print) -> Round:
    """Probe every READY version of every non-ensemble model once; restart the models
    with a dead stub and bring back the ensembles that their restart unloaded."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    result = Round()
    client = grpcclient.InferenceServerClient(cfg.url)
    try:
        index = client.get_model_repository_index(as_json=True).get("models", [])
        ready = [(m["name"], m["version"]) for m in index if m.get("state") == "READY"]
        ready_names = {name for name, _ in ready}
        ensembles = set()
        dead: dict[str, str] = {}  # model -> the probe's error
        for name in sorted(ready_names):
            config = client.get_model_config(name, as_json=True)["config"]
            if config.get("platform") == "ensemble":
                ensembles.add(name)
        for name, version in ready:
            if name in ensembles or name in dead:
                continue
            key = f"{name}:{version}"
            result.probed.append(key)
            try:
                meta = client.get_model_metadata(name, version, as_json=True)
                client.infer(
                    name,
                    probe_inputs(meta, grpcclient),
                    model_version=version,
                    client_timeout=cfg.timeout,
                )
            except InferenceServerException as e:
                message = e.message() or str(e)
                result.errors[key] = message
                if is_dead_stub(message):
                    dead[name] = f"{key}: {message}"
                else:
                    log(f"watchdog: probe of {key} failed (not a dead stub, left alone): {message}")
    finally:
        client.close()

    for name, why in dead.items():
        log(f"watchdog: {why}")
        log(f"watchdog: restarting '{name}' (unload + load: new stub processes)")
        admin.restart(cfg.url, name)
        result.restarted.append(name)
    if dead:
        now_ready = {m.name for m in admin.list_models(cfg.url) if m.state == "READY"}
        for name in sorted(ensembles - now_ready):
            log(f"watchdog: loading ensemble '{name}' again")
            admin.load(cfg.url, name)
            result.reloaded_ensembles.append(name)
    return result


def watch(
    cfg: WatchdogConfig,
    stop: threading.Event,
    log: Callable[[str], None] = print,
) -> None:
    """Run :func:`check_once` every ``cfg.interval`` seconds until ``stop`` is set.
    A round that cannot reach the server (restarting, shutting down) is skipped."""
    while not stop.wait(cfg.interval):
        try:
            check_once(cfg, log)
        except Exception as e:  # keep watching: the server may be restarting
            log(f"watchdog: round skipped: {type(e).__name__}: {e}")


def main_loop(cfg: WatchdogConfig) -> int:
    """``python -m serve watchdog``: watch until Ctrl-C / SIGTERM."""
    import signal

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log = stderr_log
    log(f"watchdog: probing {cfg.url} every {cfg.interval:g} s")
    watch(cfg, stop, log)
    return 0


def stderr_log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {message}", file=sys.stderr, flush=True)
