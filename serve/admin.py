"""Operate a live Triton server (explicit model control) through its repository API:
list models and versions, load, unload, roll back, and read health and metrics.

Uses tritonclient's gRPC client (thread-safe, unlike the HTTP one) and urllib for the
Prometheus endpoint; no torch.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from serve.client import DEFAULT_URLS, ModelNotReady, ServerUnavailable


@dataclass(frozen=True)
class ModelVersion:
    """One row of the repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


def _client(url: str | None) -> Any:
    import tritonclient.grpc as grpcclient

    url = url or DEFAULT_URLS["grpc"]
    client = grpcclient.InferenceServerClient(url)
    try:
        client.is_server_live()
    except Exception as e:
        client.close()
        raise ServerUnavailable(f"no Triton server at {url} (grpc): {e}") from e
    return client


def list_models(url: str | None = None) -> list[ModelVersion]:
    """Every model (and version) the server's repository knows, with its state."""
    client = _client(url)
    try:
        index = client.get_model_repository_index(as_json=True).get("models", [])
    finally:
        client.close()
    return [
        ModelVersion(
            m["name"], m.get("version", ""), m.get("state", "UNKNOWN"), m.get("reason", "")
        )
        for m in index
    ]


def ready_versions(url: str | None, model: str) -> list[int]:
    return sorted(
        int(m.version)
        for m in list_models(url)
        if m.name == model and m.state == "READY" and m.version.isdigit()
    )


ROLLBACK_MARK = "rollback_restores_version_policy"


def _current_config(url: str | None, model: str) -> dict[str, Any] | None:
    client = _client(url)
    try:
        return client.get_model_config(model, as_json=True)["config"]
    except Exception:  # not loaded: nothing to restore
        return None
    finally:
        client.close()


def load(url: str | None, model: str, config: dict[str, Any] | None = None) -> None:
    """(Re)load ``model`` from the repository (optionally with a config override).

    After a :func:`rollback`, a plain load restores the repository's version policy:
    Triton keeps an override until the files change, so the policy saved by the
    rollback is put back explicitly.
    """
    from tritonclient.utils import InferenceServerException

    if config is None:
        current = _current_config(url, model)
        params = (current or {}).get("parameters", {})
        if ROLLBACK_MARK in params:
            config = dict(current)
            config["version_policy"] = json.loads(params[ROLLBACK_MARK]["string_value"])
            config["parameters"] = {k: v for k, v in params.items() if k != ROLLBACK_MARK}
    client = _client(url)
    try:
        client.load_model(model, config=json.dumps(config) if config else None)
    except InferenceServerException as e:
        raise ModelNotReady(f"loading '{model}' failed: {e.message()}") from e
    finally:
        client.close()


def unload(url: str | None, model: str) -> None:
    client = _client(url)
    try:
        client.unload_model(model)
    finally:
        client.close()


def restart(url: str | None, model: str) -> None:
    """Unload and load ``model``: new backend processes. Measured on Triton 2.51: after a
    python-backend stub dies, the model stays READY but every request fails with "Stub
    process ... is not healthy", and a plain load is a no-op while the files are unchanged;
    this brings it back."""
    client = _client(url)
    try:
        client.unload_model(model)
        deadline = time.monotonic() + 60
        while model in {
            m["name"]
            for m in client.get_model_repository_index(as_json=True).get("models", [])
            if m.get("state") == "READY"
        }:
            if time.monotonic() > deadline:
                raise ModelNotReady(f"'{model}' did not unload within 60 s")
            time.sleep(0.1)
    finally:
        client.close()
    load(url, model)


def rollback(url: str | None, model: str) -> tuple[int, int]:
    """Serve the version before the newest loaded one, alone (a config override with a
    ``specific`` version policy). ``load`` undoes it. Returns (from, to) versions."""
    loaded = ready_versions(url, model)
    if not loaded:
        raise ModelNotReady(f"model '{model}' has no loaded version to roll back from")
    current = loaded[-1]
    known = sorted(
        {int(m.version) for m in list_models(url) if m.name == model and m.version.isdigit()}
    )
    older = [v for v in (known or loaded) if v < current]
    if not older:
        raise ModelNotReady(f"model '{model}' has no version older than {current} to roll back to")
    client = _client(url)
    try:
        config = client.get_model_config(model, as_json=True)["config"]
    finally:
        client.close()
    target = older[-1]
    params = config.setdefault("parameters", {})
    if ROLLBACK_MARK not in params:  # remember the repository's policy for `load`
        policy = config.get("version_policy") or {"latest": {"num_versions": 1}}
        params[ROLLBACK_MARK] = {"string_value": json.dumps(policy)}
    config["version_policy"] = {"specific": {"versions": [str(target)]}}
    load(url, model, config)
    return current, target


_METRIC = re.compile(r"^(nv_inference_\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$")


def read_metrics(metrics_url: str) -> dict[tuple[str, str], dict[str, float]]:
    """Prometheus counters per (model, version): nv_inference_* name -> value."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
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


def health(url: str | None, metrics_url: str) -> dict[str, Any]:
    """Server liveness/readiness, each model's state, and metrics per model version."""
    client = _client(url)
    try:
        live, ready = client.is_server_live(), client.is_server_ready()
    finally:
        client.close()
    models = list_models(url)
    try:
        metrics = read_metrics(metrics_url)
        metrics_error = ""
    except OSError as e:
        metrics, metrics_error = {}, f"metrics endpoint {metrics_url} unreachable: {e}"
    rows = []
    for m in models:
        counters = metrics.get((m.name, m.version), {})
        rows.append(
            {
                "model": m.name,
                "version": m.version,
                "state": m.state,
                "reason": m.reason,
                **summarize_metrics(counters),
            }
        )
    return {"live": live, "ready": ready, "models": rows, "metrics_error": metrics_error}
