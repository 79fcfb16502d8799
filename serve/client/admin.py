"""Operate a live Triton server (explicit model control) through its repository API:
list models and versions, load, unload, restart, roll back, and read health and metrics.

These are control-plane calls: on a server started by ``serve run`` they carry the admin
key (``serve/core/auth.py``; found for the URL unless given). Every call has a deadline.
Uses tritonclient's gRPC client (thread-safe, unlike the HTTP one) and urllib for the
Prometheus endpoint; no torch.
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
from serve.core.errors import ClientError, ModelNotReady, classify_error

CALL_TIMEOUT = 30.0  # seconds for an index/config/unload call
LOAD_TIMEOUT = 300.0  # seconds for a load (a TensorRT engine can take a while)
ROLLBACK_MARK = "rollback_restores_version_policy"
RESTART_MARK = "restart_generation"


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
    ) -> None:
        from serve.client.connect import make_client

        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.key = key if key is not None else auth.resolve_key(self.url)
        self.timeout = timeout
        self.client = make_client(protocol, self.url, min(10.0, timeout), timeout)

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
            return getattr(self.client, fn)(*args, headers=auth.headers(self.key), **kwargs)
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


@contextlib.contextmanager
def session(url: str | None, key: str | None = None, protocol: str = "grpc") -> Iterator[Admin]:
    a = Admin(url, key, protocol=protocol)
    try:
        yield a
    finally:
        a.close()


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
    with session(url, key) as a:
        if config is None:
            current = a.config(model)
            params = (current or {}).get("parameters", {})
            if ROLLBACK_MARK in params:
                config = dict(current or {})
                config["version_policy"] = json.loads(params[ROLLBACK_MARK]["string_value"])
                config["parameters"] = {k: v for k, v in params.items() if k != ROLLBACK_MARK}
        a.load(model, config)


def unload(url: str | None, model: str, key: str | None = None) -> None:
    with session(url, key) as a:
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
    with session(url, key) as a:
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
    ``specific`` version policy). ``load`` undoes it. Returns (from, to) versions."""
    with session(url, key) as a:
        rows = [m for m in a.index() if m.name == model and m.version.isdigit()]
        loaded = sorted(int(m.version) for m in rows if m.state == "READY")
        if not loaded:
            raise ModelNotReady(f"model '{model}' has no loaded version to roll back from")
        current = loaded[-1]
        older = [v for v in sorted({int(m.version) for m in rows} or loaded) if v < current]
        if not older:
            raise ModelNotReady(
                f"model '{model}' has no version older than {current} to roll back to"
            )
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


def read_metrics(metrics_url: str, timeout: float = 5.0) -> dict[tuple[str, str], dict[str, float]]:
    """Prometheus counters per (model, version): nv_inference_* name -> value."""
    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], dict[str, float]] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in m.group(2).split(",") if "=" in kv)
        model = labels.get("model", "").strip('"')
        version = labels.get("version", "").strip('"')
        out.setdefault((model, version), {})[m.group(1)] = float(m.group(3))
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
    return {"live": live, "ready": ready, "models": rows, "metrics_error": metrics_error}
