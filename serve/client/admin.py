"""Operate a live Triton server (explicit model control) through its repository API:
list models and versions, load, unload, restart, roll back, and read health and metrics.

These are control-plane calls: on a server started by ``serve run`` they carry the admin
key (``serve/core/auth.py``; found for the URL unless given). Every call has a deadline.
Uses tritonclient's gRPC client (thread-safe, unlike the HTTP one) and urllib for the
Prometheus endpoint and the front's replica control; no torch.

With several replicas behind the front (``serve run --replicas N``, ``--replica``), a
control call must reach each one: :func:`replicas` lists them (the front's
``/v2/trainserve/replicas``), an :class:`Admin` with ``replica`` talks to one, and
:func:`load`, :func:`rollback`, :func:`restart` roll out - one replica at a time out of
rotation, changed, ready and warmed, back - so no request fails and every answer comes
from one whole version; :func:`unload` reaches each in turn.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from serve.client.connect import DEFAULT_URLS
from serve.core import auth
from serve.core.errors import ClientError, ModelNotReady, ServerUnavailable, classify_error

CALL_TIMEOUT = 30.0  # seconds for an index/config/unload call
LOAD_TIMEOUT = 300.0  # seconds for a load (a TensorRT engine can take a while)
ROLLBACK_MARK = "rollback_restores_version_policy"
RESTART_MARK = "restart_generation"
REPLICA_HEADER = "trainserve-replica"  # as serve/runtime/front_options.py
ROLLOUT_TIMEOUT = 120.0  # seconds for a replica to drain, or to come back in rotation


@dataclass(frozen=True)
class ReplicaState:
    """One replica behind the front, as its health checks see it."""

    name: str
    address: str
    state: str  # UP, DOWN, DRAIN, MAINT (HAProxy's words; "UP 1/2": coming up)
    in_flight: int
    requests: int
    check: str = ""
    local: bool = True  # in this machine's stack (shared memory reaches it)

    @property
    def up(self) -> bool:
        return self.state == "UP"


@dataclass(frozen=True)
class ModelVersion:
    """One row of the repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


class Admin:
    """A control-plane session with one server (``with Admin(url) as a: ...``)."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        timeout: float = CALL_TIMEOUT,
        protocol: str = "grpc",
        replica: str | None = None,
    ) -> None:
        from serve.client.connect import make_client

        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.key = key if key is not None else auth.resolve_key(self.url)
        self.timeout = timeout
        self.replica = replica  # the one replica every call of this session is for
        self.client = make_client(protocol, self.url, min(10.0, timeout), timeout)

    def headers(self) -> dict[str, str] | None:
        """The key, and the replica this session is for."""
        h = dict(auth.headers(self.key) or {})
        if self.replica:
            h[REPLICA_HEADER] = self.replica
        return h or None

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def call(
        self, what: str, fn: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """``self.client.<fn>(*args)`` with the key header and a deadline; errors typed."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = timeout or self.timeout
        else:
            kwargs.pop("as_json", None)  # the HTTP client answers JSON anyway
        try:
            return getattr(self.client, fn)(*args, headers=self.headers(), **kwargs)
        except Exception as e:  # noqa: BLE001 - tritonclient/grpc errors, mapped
            err = classify_error(e, what, self.url, self.protocol, args[0] if args else "")
            if "restricted" in str(e).lower() or "unauthenticated" in str(e).lower():
                hint = "" if self.key else " (no admin key found: pass --admin-key-file)"
                raise type(err)(f"{err}{hint}") from e
            raise err from e

    def index(self) -> list[ModelVersion]:
        raw = self.call("repository index", "get_model_repository_index", as_json=True)
        if isinstance(raw, list):  # HTTP
            raw = {"models": raw}
        return [
            ModelVersion(
                m["name"], m.get("version", ""), m.get("state", "UNKNOWN"), m.get("reason", "")
            )
            for m in raw.get("models", [])
        ]

    def completed(self) -> dict[str, int]:
        """Requests each model has finished so far (successes + failures; statistics API):
        a count that moves means the model works, however slowly."""
        raw = self.call("statistics", "get_inference_statistics", "", as_json=True)
        done: dict[str, int] = {}
        for m in raw.get("model_stats", []):
            stats = m.get("inference_stats", {})
            n = sum(int(stats.get(k, {}).get("count", 0)) for k in ("success", "fail"))
            done[m["name"]] = done.get(m["name"], 0) + n
        return done

    def config(self, model: str) -> dict[str, Any] | None:
        """The loaded config of ``model`` (None when it is not loaded)."""
        try:
            raw = self.call("config", "get_model_config", model, as_json=True)
            return raw.get("config", raw)
        except ModelNotReady:
            return None

    def load(self, model: str, config: dict[str, Any] | None = None) -> None:
        try:
            self.call(
                f"loading '{model}'",
                "load_model",
                model,
                config=json.dumps(config) if config else None,
                timeout=LOAD_TIMEOUT,
            )
        except ClientError as e:
            raise ModelNotReady(f"loading '{model}' failed: {e}") from e

    def unload(self, model: str) -> None:
        self.call(f"unloading '{model}'", "unload_model", model)

    def model_ready(self, model: str) -> bool:
        kw = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        try:
            return bool(self.client.is_model_ready(model, headers=self.headers(), **kw))
        except Exception:  # noqa: BLE001 - not ready, or not reachable now
            return False


@contextlib.contextmanager
def session(
    url: str | None, key: str | None = None, protocol: str = "grpc", replica: str | None = None
) -> Iterator[Admin]:
    a = Admin(url, key, protocol=protocol, replica=replica)
    try:
        yield a
    finally:
        a.close()


def _replica_control(
    url: str | None, key: str | None, path: str = "", method: str = "GET"
) -> list[ReplicaState] | None:
    """The front's replica control (an HTTP route, the owner's): the replicas' states;
    None when ``url`` is not a ``serve run`` front that has it."""
    http = auth.http_url(url)
    if not http:
        return None
    req = urllib.request.Request(
        f"http://{http}/v2/trainserve/replicas{path}",
        method=method,
        headers=auth.headers(key if key is not None else auth.resolve_key(url)) or {},
    )
    try:
        with urllib.request.urlopen(req, timeout=CALL_TIMEOUT) as r:
            rows = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return [ReplicaState(**row) for row in rows]


def replicas(url: str | None, key: str | None = None) -> list[ReplicaState]:
    """The replicas behind the front at ``url`` ([] for a server without replicas: a
    plain tritonserver, or a front started before replicas existed)."""
    return _replica_control(url, key) or []


def _state(url: str | None, key: str | None, name: str) -> ReplicaState:
    for r in replicas(url, key):
        if r.name == name:
            return r
    raise ServerUnavailable(f"the front at {url} no longer lists replica {name}")


def _until(what: str, done: Any, timeout: float = ROLLOUT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"{what}: not done within {timeout:.0f} s")
        time.sleep(0.1)


def settle(a: Admin, what: str, timeout: float = ROLLOUT_TIMEOUT) -> None:
    """Wait until the server of ``a`` is ready again after a model was loaded: Triton
    2.51 reloads the ensembles over that model after the load has answered (until then
    the server is not ready); one that stays unavailable is loaded again."""
    kw = {"client_timeout": a.timeout} if a.protocol == "grpc" else {}
    deadline = time.monotonic() + timeout
    reloaded: set[str] = set()
    first_seen: dict[str, float] = {}
    while True:
        try:
            if a.client.is_server_ready(headers=a.headers(), **kw):
                return
        except Exception:  # noqa: BLE001 - loading: ask again
            pass
        now = time.monotonic()
        if now > deadline:
            raise ServerUnavailable(f"{what}: the server was not ready {timeout:.0f} s later")
        for m in a.index():
            if m.state == "READY" or m.name in reloaded:
                continue
            first_seen.setdefault(m.name, now)
            if now - first_seen[m.name] > 2.0:  # not coming back by itself: load it
                with contextlib.suppress(ClientError):
                    a.load(m.name)
                reloaded.add(m.name)
        time.sleep(0.1)


def rollout(
    url: str | None, key: str | None, what: str, change: Any, model: str | None = None
) -> list[str]:
    """``change(admin)`` on every replica, one at a time: out of rotation (drained: its
    requests in flight finish), changed, ``model`` ready on it, back in rotation and seen
    up by the front's health checks; the others serve meanwhile. A replica that is down
    is changed without draining (it gets no traffic). A single server: ``change`` once.
    Returns the replicas changed, in order."""
    reps = replicas(url, key)
    if len(reps) <= 1:
        with session(url, key, replica=reps[0].name if reps else None) as a:
            change(a)
        return [r.name for r in reps]
    done = []
    for r in reps:
        was_up = r.up
        if was_up:
            _replica_control(url, key, f"/{r.name}/drain", "POST")
            _until(
                f"{what}: draining replica {r.name}",
                lambda r=r: _state(url, key, r.name).in_flight == 0,
            )
        try:
            with session(url, key, replica=r.name) as a:
                change(a)
                if model is not None:
                    _until(
                        f"{what}: '{model}' ready on replica {r.name}", lambda: a.model_ready(model)
                    )
        finally:
            _replica_control(url, key, f"/{r.name}/ready", "POST")
        if was_up:
            _until(
                f"{what}: replica {r.name} back in rotation",
                lambda r=r: _state(url, key, r.name).up,
            )
        done.append(r.name)
    return done


def list_models(
    url: str | None = None, key: str | None = None, protocol: str = "grpc"
) -> list[ModelVersion]:
    """Every model (and version) the server's repository knows, with its state."""
    with session(url, key, protocol) as a:
        return a.index()


def ready_versions(url: str | None, model: str, key: str | None = None) -> list[int]:
    return sorted(
        int(m.version)
        for m in list_models(url, key)
        if m.name == model and m.state == "READY" and m.version.isdigit()
    )


def load(
    url: str | None, model: str, config: dict[str, Any] | None = None, key: str | None = None
) -> None:
    """(Re)load ``model`` from the repository (optionally with a config override).

    After a :func:`rollback`, a plain load restores the repository's version policy:
    Triton keeps an override until the files change, so the policy saved by the
    rollback is put back explicitly.
    """

    def change(a: Admin) -> None:
        override = config
        if override is None:
            current = a.config(model)
            params = (current or {}).get("parameters", {})
            if ROLLBACK_MARK in params:
                override = dict(current or {})
                override["version_policy"] = json.loads(params[ROLLBACK_MARK]["string_value"])
                override["parameters"] = {k: v for k, v in params.items() if k != ROLLBACK_MARK}
        a.load(model, override)

    rollout(url, key, f"loading '{model}'", change, model)


def unload(url: str | None, model: str, key: str | None = None) -> None:
    """Unload ``model`` from every replica."""
    names: list[str | None] = [r.name for r in replicas(url, key)]
    for name in names or [None]:
        with session(url, key, replica=name) as a:
            a.unload(model)


def restart(url: str | None, model: str, key: str | None = None) -> str:
    """Fresh backend processes for ``model`` without a window where it is unavailable.

    Measured on Triton 2.51: after a python-backend stub dies the model stays READY but
    every request fails with "Stub process ... is not healthy"; a plain load is a no-op
    while the files are unchanged, and unload + load leaves ~1 s in which requests get
    "no available versions". A load with the current config plus a bumped
    ``restart_generation`` parameter makes Triton build new instances first and swap
    them in (the old ones are unloaded after), so requests never see the model missing.
    Falls back to unload + load when that reload fails. Returns how it restarted.
    """
    how: list[str] = []
    rollout(url, key, f"restarting '{model}'", lambda a: how.append(restart_one(a, model)), model)
    return how[-1] if how else "reload"


def restart_one(a: Admin, model: str) -> str:
    """:func:`restart` on the one server (or replica) of ``a``."""
    config = a.config(model)
    if config is not None:
        params = config.setdefault("parameters", {})
        previous = params.get(RESTART_MARK, {}).get("string_value", "0")
        generation = int(previous) + 1 if previous.isdigit() else 1
        params[RESTART_MARK] = {"string_value": str(generation)}
        try:
            a.load(model, config)
            return "reload"
        except ModelNotReady:
            pass  # below: the slow way
    a.unload(model)
    deadline = time.monotonic() + 60
    while any(m.name == model and m.state == "READY" for m in a.index()):
        if time.monotonic() > deadline:
            raise ModelNotReady(f"'{model}' did not unload within 60 s")
        time.sleep(0.1)
    a.load(model)
    return "unload+load"


def rollback(url: str | None, model: str, key: str | None = None) -> tuple[int, int]:
    """Serve the version before the newest loaded one, alone (a config override with a
    ``specific`` version policy), on every replica in turn. ``load`` undoes it. Returns
    (from, to) versions."""
    moved: list[tuple[int, int]] = []
    rollout(
        url, key, f"rolling back '{model}'", lambda a: moved.append(rollback_one(a, model)), model
    )
    return moved[0]


def rollback_one(a: Admin, model: str) -> tuple[int, int]:
    """:func:`rollback` on the one server (or replica) of ``a``."""
    rows = [m for m in a.index() if m.name == model and m.version.isdigit()]
    loaded = sorted(int(m.version) for m in rows if m.state == "READY")
    if not loaded:
        raise ModelNotReady(f"model '{model}' has no loaded version to roll back from")
    current = loaded[-1]
    older = [v for v in sorted({int(m.version) for m in rows} or loaded) if v < current]
    if not older:
        raise ModelNotReady(f"model '{model}' has no version older than {current} to roll back to")
    config = a.config(model) or {}
    target = older[-1]
    params = config.setdefault("parameters", {})
    if ROLLBACK_MARK not in params:  # remember the repository's policy for `load`
        policy = config.get("version_policy") or {"latest": {"num_versions": 1}}
        params[ROLLBACK_MARK] = {"string_value": json.dumps(policy)}
    config["version_policy"] = {"specific": {"versions": [str(target)]}}
    a.load(model, config)
    return current, target


_METRIC = re.compile(r"^(nv_inference_\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$")


def read_metrics(
    metrics_url: str, timeout: float = 5.0, replica: str | None = None
) -> dict[tuple[str, str], dict[str, float]]:
    """Prometheus counters per (model, version): nv_inference_* name -> value, summed
    over the replicas (the front labels each sample ``replica``), or of ``replica``."""
    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], dict[str, float]] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in m.group(2).split(",") if "=" in kv)
        if replica is not None and labels.get("replica", "").strip('"') != replica:
            continue
        model = labels.get("model", "").strip('"')
        version = labels.get("version", "").strip('"')
        counters = out.setdefault((model, version), {})
        counters[m.group(1)] = counters.get(m.group(1), 0.0) + float(m.group(3))
    return out


METRIC_KEYS = ("success", "failure", "avg_queue_ms", "avg_compute_ms", "avg_batch")


def summarize_metrics(counters: dict[str, float]) -> dict[str, float]:
    """Success/failure counts, average queue and compute time per request (ms), and the
    average executed batch size, from Triton's cumulative counters."""
    ok = counters.get("nv_inference_request_success", 0.0)
    fail = counters.get("nv_inference_request_failure", 0.0)
    execs = counters.get("nv_inference_exec_count", 0.0)
    inferences = counters.get("nv_inference_count", 0.0)
    per = max(ok, 1.0)
    return {
        "success": ok,
        "failure": fail,
        "avg_queue_ms": counters.get("nv_inference_queue_duration_us", 0.0) / per / 1000,
        "avg_compute_ms": counters.get("nv_inference_compute_infer_duration_us", 0.0) / per / 1000,
        "avg_batch": inferences / execs if execs else 0.0,
    }


def health(
    url: str | None, metrics_url: str | None, key: str | None = None, protocol: str = "grpc"
) -> dict[str, Any]:
    """Server liveness/readiness, each model's state, and metrics per model version
    (``metrics_url`` None: unknown - the counts are then None, not 0)."""
    with session(url, key, protocol) as a:
        try:
            kw = {"client_timeout": a.timeout} if protocol == "grpc" else {}
            live = a.client.is_server_live(**kw)
            ready = a.client.is_server_ready(**kw)
        except Exception as e:  # noqa: BLE001
            raise classify_error(e, "health", a.url, protocol, "") from e
        models = a.index()
    metrics: dict[tuple[str, str], dict[str, float]] | None = None
    if metrics_url is None:
        metrics_error = (
            f"metrics: unknown for {a.url} (no record of its metrics port; pass "
            "--metrics-url http://HOST:PORT/metrics)"
        )
    else:
        try:
            metrics, metrics_error = read_metrics(metrics_url), ""
        except OSError as e:
            metrics_error = f"metrics endpoint {metrics_url} unreachable: {e}"
    rows = [
        {
            "model": m.name,
            "version": m.version,
            "state": m.state,
            "reason": m.reason,
            **(
                summarize_metrics(metrics.get((m.name, m.version), {}))
                if metrics is not None
                else dict.fromkeys(METRIC_KEYS)
            ),
        }
        for m in models
    ]
    reps = replicas(url, key)
    per_replica = []
    for r in reps:
        counts = None
        if metrics_url is not None and not metrics_error:
            with contextlib.suppress(OSError):
                counts = read_metrics(metrics_url, replica=r.name)
        served = {}
        if counts is not None:
            served = {f"{m}:{v}": summarize_metrics(c)["success"] for (m, v), c in counts.items()}
        per_replica.append({**r.__dict__, "served": served})
    return {
        "live": live,
        "ready": ready,
        "models": rows,
        "replicas": per_replica,
        "metrics_error": metrics_error,
    }
