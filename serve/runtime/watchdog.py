"""Heal models whose python-backend stub process died or hangs.

Measured on Triton 2.51: when a python-backend stub dies (OOM kill, segfault in a
native library, ``kill -9``), Triton keeps the model READY but every request to it
fails with "Stub process '<model>_0_0' is not healthy" - Triton never restarts it. A
stub that hangs (a native deadlock, ``SIGSTOP``) leaves requests waiting forever.

Every round the watchdog probes every loaded version of every non-ensemble model,
concurrently, with tiny valid requests (one per instance, in turn) and a deadline. A
model whose probe reports a dead stub is restarted at once; one whose probes time out
``hung_rounds`` rounds in a row *while it completes no request at all* is restarted as
hung (Triton's statistics API: a model that finished other requests while its probe
waited is busy, not hung, and is never restarted). The restart (``admin.restart``) builds new
instances before the old ones go, so clients never see the model missing. Ensembles
that lost a member are loaded again. Any other probe failure is reported, not acted on.
Known limit: one *hung* stub among several instances is not seen - it keeps the request
it hangs on, Triton hands every later request (and probe) to the others, and the model
runs at reduced capacity until every instance hangs; a *dead* one answers at once and is
found in the round.
Runs inside ``python -m serve run`` (``--watchdog SECONDS``) or against any server with
``python -m serve watchdog --url HOST:PORT``; no torch.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from serve.client import admin
from serve.client.connect import DEFAULT_URLS
from serve.core import auth

log = logging.getLogger(__name__)

# What Triton's python backend answers once an instance's stub process is gone.
DEAD_STUB_MARKERS = ("is not healthy", "stub process is not")
TIMEOUT_MARKERS = ("deadline exceeded", "timed out", "timeout")


@dataclass
class WatchdogConfig:
    """How often and how patiently to probe."""

    url: str = DEFAULT_URLS["grpc"]
    interval: float = 10.0  # seconds between rounds
    timeout: float = 30.0  # per probe (a busy server queues it behind real work)
    hung_rounds: int = 3  # consecutive timed-out probes before a model counts as hung
    admin_key: str | None = None  # None: found for the URL (serve/core/auth.py)
    replica: str | None = None  # one replica behind the front (None: whichever answers)


@dataclass
class Round:
    """What one round of probes found and did."""

    probed: list[str] = field(default_factory=list)  # "model:version"
    restarted: list[str] = field(default_factory=list)
    reloaded_ensembles: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # "model:version" -> message
    timed_out: list[str] = field(default_factory=list)


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


def instance_count(config: dict[str, Any]) -> int:
    """A model's instances, from its config as the API returns it (JSON)."""
    return sum(int(g.get("count", 1) or 1) for g in config.get("instance_group", [])) or 1


def is_dead_stub(message: str) -> bool:
    """True for the python backend's "stub process is not healthy" errors."""
    text = message.lower()
    return any(m in text for m in DEAD_STUB_MARKERS)


def stamped(message: str) -> None:
    """Log ``message`` with the time (the watchdog's lines sit in the server's log)."""
    log.warning("%s %s", time.strftime("%Y-%m-%d %H:%M:%S"), message)


def is_timeout(message: str) -> bool:
    text = message.lower()
    return any(m in text for m in TIMEOUT_MARKERS)


class Watchdog:
    """Probe rounds against one server; remembers consecutive timeouts per model."""

    def __init__(self, cfg: WatchdogConfig, log_fn: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.say = log_fn or stamped
        self.timeouts: dict[str, int] = {}  # model -> consecutive rounds with a timed-out probe

    def _probe(self, name: str, version: str, instances: int = 1) -> str | None:
        """None when the model answered, else the error message. One probe after another,
        as many as the model has instances: Triton hands an idle model's requests to its
        instances in turn, so each instance's stub is reached (a dead one answers at once,
        so under load it is the one that takes the next request). With the admin key: the
        public front serves internal models (``<model>_preprocess``) only to the owner, and
        the owner's requests are not refused as busy."""
        import tritonclient.grpc as grpcclient

        headers = self._headers()
        client = grpcclient.InferenceServerClient(self.cfg.url)
        try:
            meta = client.get_model_metadata(
                name, version, as_json=True, headers=headers, client_timeout=self.cfg.timeout
            )
            for _ in range(max(1, instances)):
                client.infer(
                    name,
                    probe_inputs(meta, grpcclient),
                    model_version=version,
                    headers=headers,
                    client_timeout=self.cfg.timeout,
                )
            return None
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            return (e.message() if hasattr(e, "message") and callable(e.message) else "") or str(e)
        finally:
            client.close()

    def _headers(self) -> dict[str, str] | None:
        key = self.cfg.admin_key or auth.resolve_key(self.cfg.url)
        headers = dict(auth.headers(key) or {})
        if self.cfg.replica:
            headers[admin.REPLICA_HEADER] = self.cfg.replica
        return headers or None

    def _session(self) -> Any:
        return admin.session(self.cfg.url, self.cfg.admin_key, replica=self.cfg.replica)

    @staticmethod
    def _completed(a: admin.Admin) -> dict[str, int]:
        """Finished requests per model; empty when statistics cannot be read (a hint)."""
        try:
            return a.completed()
        except Exception:  # noqa: BLE001 - without statistics, timeouts count as before
            return {}

    def _watch_progress(self, models: set[str], before: dict[str, int]) -> dict[str, int]:
        """Finished-request counts, polled until each of ``models`` moved past ``before``
        or a window of max(probe timeout, 2 s) ends: a busy model shows progress."""
        deadline = time.monotonic() + max(self.cfg.timeout, 2.0)
        with self._session() as a:
            while True:
                now = self._completed(a)
                moved = all(now.get(m, -1) > before.get(m, -1) >= 0 for m in models)
                if moved or not now or time.monotonic() > deadline:
                    return now
                time.sleep(0.2)

    def check_once(self) -> Round:
        """Probe every READY version of every non-ensemble model (the models concurrently,
        each as many times as it has instances, one probe after another);
        restart the models with a dead or hung stub and bring back their ensembles."""
        result = Round()
        with self._session() as a:
            ready = [(m.name, m.version) for m in a.index() if m.state == "READY"]
            configs = {name: a.config(name) or {} for name in {n for n, _ in ready}}
            ensembles = {n for n, c in configs.items() if c.get("platform") == "ensemble"}
            completed_before = self._completed(a)
        targets = [(n, v) for n, v in ready if n not in ensembles]
        result.probed = [f"{n}:{v}" for n, v in targets]
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(targets)))) as pool:
            outcomes = list(
                pool.map(lambda t: self._probe(t[0], t[1], instance_count(configs[t[0]])), targets)
            )
        slow = {n for (n, _), e in zip(targets, outcomes, strict=True) if e and is_timeout(e)}
        completed_after = self._watch_progress(slow, completed_before) if slow else {}
        to_restart: dict[str, str] = {}
        timed_out_models: set[str] = set()
        for (name, version), error in zip(targets, outcomes, strict=True):
            key = f"{name}:{version}"
            if error is None:
                continue
            result.errors[key] = error
            if is_dead_stub(error):
                to_restart[name] = f"{key}: {error}"
            elif is_timeout(error):
                result.timed_out.append(key)
                timed_out_models.add(name)
            else:
                self.say(f"watchdog: probe of {key} failed (not a dead stub, left alone): {error}")
        for name in {n for n, _ in targets}:
            # requests of this model finished while its probe waited: busy, not hung
            moved = completed_after.get(name, -1) > completed_before.get(name, -1) >= 0
            if name in timed_out_models and moved:
                self.say(
                    f"watchdog: {name} did not answer the probe within {self.cfg.timeout:g} s "
                    "but finished other requests meanwhile: busy, not hung"
                )
                timed_out_models.discard(name)
            self.timeouts[name] = self.timeouts.get(name, 0) + 1 if name in timed_out_models else 0
            if self.timeouts[name] >= self.cfg.hung_rounds and name not in to_restart:
                to_restart[name] = (
                    f"{name}: no answer within {self.cfg.timeout:g} s in "
                    f"{self.timeouts[name]} rounds in a row (hung stub)"
                )
        self._heal(to_restart, ensembles, result)
        return result

    def _heal(self, dead: dict[str, str], ensembles: set[str], result: Round) -> None:
        where = f" on replica {self.cfg.replica}" if self.cfg.replica else ""
        for name, why in dead.items():
            self.say(f"watchdog: {why}{where}")
            self.say(f"watchdog: restarting '{name}'{where} (new stub processes)")
            with self._session() as a:
                how = admin.restart_one(a, name)
            self.say(f"watchdog: restarted '{name}'{where} ({how})")
            self.timeouts[name] = 0
            result.restarted.append(name)
        if dead:
            with self._session() as a:
                now_ready = {m.name for m in a.index() if m.state == "READY"}
                for name in sorted(ensembles - now_ready):
                    self.say(f"watchdog: loading ensemble '{name}' again")
                    a.load(name)
                    result.reloaded_ensembles.append(name)


def check_once(cfg: WatchdogConfig, log: Callable[[str], None] = print) -> Round:
    """One round (see :class:`Watchdog`); a hung stub needs state across rounds."""
    return Watchdog(cfg, log).check_once()


def watch(
    cfg: WatchdogConfig, stop: threading.Event, log_fn: Callable[[str], None] | None = None
) -> None:
    """Run rounds every ``cfg.interval`` seconds until ``stop`` is set: one per replica in
    rotation behind the front (each remembers its own hung rounds), or one for a server
    without replicas. A round that cannot reach the server (restarting, shutting down)
    is skipped."""
    dogs: dict[str | None, Watchdog] = {}
    while not stop.wait(cfg.interval):
        names: list[str | None]
        try:
            names = [r.name for r in admin.replicas(cfg.url, cfg.admin_key) if r.up]
        except Exception:  # noqa: BLE001 - the front is restarting: next round
            names = []
        for name in names or [cfg.replica]:
            dog = dogs.setdefault(name, Watchdog(replace(cfg, replica=name), log_fn))
            try:
                dog.check_once()
            except Exception as e:  # noqa: BLE001 - keep watching: the server may be restarting
                dog.say(f"watchdog: round skipped: {type(e).__name__}: {e}")


def main_loop(cfg: WatchdogConfig) -> int:
    """``python -m serve watchdog``: watch until Ctrl-C / SIGTERM."""
    import signal

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("watchdog: probing %s every %g s", cfg.url, cfg.interval)
    watch(cfg, stop)
    return 0
