"""Kubernetes manifests rendered from a published repository and validated
offline against the Kubernetes JSON schema (kubernetes-validate bundles the schemas; no
cluster runs here). The ServiceMonitor is a prometheus-operator CRD, not in the core
schema: it is checked for the fields prometheus-operator needs instead."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from export.triton.config import ServingConfig, classifier_config, set_plans
from serve.core import auth
from serve.core.model_config import config_text
from serve.deploy.k8s import QUEUE_METRIC
from tests.helpers import example_card, run_cli

K8S_VERSION = "1.31.0"  # the schema version validated against (bundled by the package)
CORE_KINDS = {
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "ConfigMap",
    "Secret",
    "PodDisruptionBudget",
}


def _repo(root: Path, serving: ServingConfig, plans: dict[str, dict] | None = None) -> Path:
    """A repository holding the project's real generated classifier config."""
    cfg = classifier_config("antsbees", example_card(), serving)
    if plans:
        set_plans(cfg, {cc: f"model.sm{cc.replace('.', '')}.plan" for cc in plans})
    (root / "antsbees" / "1").mkdir(parents=True)
    (root / "antsbees" / "config.pbtxt").write_text(config_text(cfg))
    for cc, meta in (plans or {}).items():
        name = f"model.sm{cc.replace('.', '')}.plan.json"
        (root / "antsbees" / "1" / name).write_text(json.dumps(meta))
    return root


def _render(repo: Path, out: Path, *extra: str) -> list[dict]:
    proc = run_cli("serve", "manifests", "--model-repository", str(repo), "--out", str(out), *extra)
    assert "kubectl apply -f" in proc.stdout
    docs = list(yaml.safe_load_all((out / "triton.yaml").read_text()))
    return docs + list(yaml.safe_load_all((out / "secret.yaml").read_text()))


def _validate(docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error
        else:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_cpu_repository_manifests_validate_and_wire_up(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo", ServingConfig())
    key_file = auth.write_key_file(tmp_path / "key", "k-123")
    docs = _render(repo, tmp_path / "out", "--replicas", "3", "--admin-key-file", str(key_file))
    _validate(docs)
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == CORE_KINDS | {"ServiceMonitor"}
    dep, svc, hpa = by_kind["Deployment"], by_kind["Service"], by_kind["HorizontalPodAutoscaler"]
    assert dep["spec"]["replicas"] == 3
    # rolling updates with no unavailable replica, a disruption budget
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert by_kind["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    pdb_selector = by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert pdb_selector == dep["spec"]["selector"]["matchLabels"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    # the first release clear of every published Triton security bulletin
    assert c["image"] == "nvcr.io/nvidia/tritonserver:26.07-py3"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    # The restricted APIs: serve/core/auth.py's flags, the key from the Secret via the env.
    for flag in auth.server_flags("$(TRITON_ADMIN_KEY)"):
        assert flag in c["args"]
    (env,) = c["env"]
    ref = env["valueFrom"]["secretKeyRef"]
    secret = by_kind["Secret"]
    assert env["name"] == "TRITON_ADMIN_KEY" and ref["name"] == secret["metadata"]["name"]
    assert secret["stringData"][ref["key"]] == "k-123"
    assert stat.S_IMODE((tmp_path / "out" / "secret.yaml").stat().st_mode) == 0o600
    # Default store: a read-only PVC mounted where --model-repository points.
    assert "--model-repository=/models" in c["args"] and "--load-model=antsbees" in c["args"]
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "triton-models"
    assert c["volumeMounts"][0]["readOnly"] is True
    # python backend: the NGC image gets this environment's pinned ORT/NumPy/Pillow.
    assert c["command"][:2] == ["/bin/sh", "-c"] and "onnxruntime==" in c["command"][2]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    # Service selects the pods; HPA scales the Deployment on queue time per request.
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_METRIC
    rules = yaml.safe_load(by_kind["ConfigMap"]["data"]["rules.yaml"])["rules"]
    assert rules[0]["name"]["as"] == QUEUE_METRIC
    assert "nv_inference_queue_duration_us" in rules[0]["metricsQuery"]
    mon = by_kind["ServiceMonitor"]
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert mon["spec"]["endpoints"][0]["port"] == "metrics"
    assert mon["spec"]["selector"]["matchLabels"] == svc["metadata"]["labels"]


def test_gpu_repository_on_object_storage(tmp_path: Path) -> None:
    serving = ServingConfig(target="gpu", gpu_backend="tensorrt", preferred_batch_sizes=[16])
    meta = {"compute_capability": "9.0", "version_compatible": True}
    repo = _repo(tmp_path / "repo", serving, {"9.0": meta})
    docs = _render(repo, tmp_path / "out", "--model-store", "s3://bucket/models")
    _validate(docs)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--model-repository=s3://bucket/models" in c["args"]
    assert "volumes" not in dep["spec"]["template"]["spec"] and "volumeMounts" not in c
    assert c["envFrom"][0]["secretRef"] == {"name": "triton-storage", "optional": True}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--allow-gpu-metrics=true" in c["args"]
    assert "--backend-config=tensorrt,version-compatible=true" in c["args"]
    assert "command" not in c  # tensorrt_plan needs nothing beyond the NGC image


def test_the_schema_check_catches_a_broken_manifest(tmp_path: Path) -> None:
    docs = _render(_repo(tmp_path / "repo", ServingConfig()), tmp_path / "out")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_manifests_need_a_published_repository(tmp_path: Path) -> None:
    proc = run_cli(
        "serve",
        "manifests",
        "--model-repository",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    assert proc.returncode == 2 and "no published model" in proc.stderr
    proc = run_cli(
        "serve",
        "manifests",
        "--model-repository",
        str(tmp_path),
        "--model-store",
        "ftp://x",
        check=False,
    )
    assert proc.returncode == 2 and "model store must start with" in proc.stderr
