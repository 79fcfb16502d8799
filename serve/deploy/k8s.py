"""Kubernetes manifests for N Triton servers behind one Service, rendered from the
published model repository (torch-free): ``python -m serve manifests`` /
``make deploy-manifests``.

What is rendered (``<out>/triton.yaml``, several documents, plus ``<out>/secret.yaml``):

* ``Deployment``: the NGC image (default ``nvcr.io/nvidia/tritonserver:26.07-py3``, the
  first release clear of every published Triton security bulletin; 24.10 is the bundled
  2.51), ``--model-repository`` on object
  storage (``s3://`` / ``gs://`` / ``as://``, read by Triton itself, credentials from the
  optional ``<name>-storage`` Secret) or on a volume (``pvc:CLAIM``, mounted read-only),
  explicit model control loading every published model, readiness
  ``/v2/health/ready``, liveness ``/v2/health/live`` and a startup probe that gives slow
  loads (warmup, engine deserialization) time; Prometheus scrape annotations for :8002;
  a GPU per pod when a model runs on GPU; the restricted control APIs behind the admin
  key (serve/core/auth.py's flags, the key taken from the Secret through ``$(TRITON_ADMIN_KEY)``);
* ``PodDisruptionBudget``: at most one replica voluntarily down at a time; with the
  Deployment's rolling update (``maxUnavailable: 0``, ``maxSurge: 1``, ``minReadySeconds``)
  the same promise ``serve run --replicas`` keeps on one machine: no replica leaves
  rotation before another is ready;
* ``Service`` (HTTP 8000, gRPC 8001, metrics 8002);
* ``HorizontalPodAutoscaler`` (autoscaling/v2) on a Pods metric,
  ``triton_queue_time_us_per_request``: Triton's cumulative queue time
  (``nv_inference_queue_duration_us``) over its successful requests, per pod, served to
  the HPA by prometheus-adapter with the rule in the ``ConfigMap`` rendered beside it;
* ``ServiceMonitor`` (prometheus-operator CRD) scraping the metrics port;
* ``Secret`` with the admin key (a fresh random key unless one is given), in its own
  file, mode 0600.

CPU (python-backend) repositories need ONNX Runtime, NumPy and Pillow inside the
container, which the NGC image lacks: the container installs the pinned versions of this
environment before it starts Triton (or build an image with them and pass
``--no-python-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tritonclient.grpc import model_config_pb2 as mc

from serve.backend.errors import UsageError
from serve.core import auth
from serve.core.files import atomic_write_text
from serve.core.model_config import parse_config

# The cluster reaches :8000, so the default is the first release clear of every published
# Triton security bulletin (docs/deployment.md): 26.07, built on CUDA 13.3.1 (releases before it are
# affected by CVE-2025-23316, CVE-2026-24207, CVE-2026-47627, among others). The generated
# configs use nothing newer than the bundled 2.51 (NGC 24.10); a TensorRT plan must come
# from the image's own TensorRT (model.plan.json records the version it was built with).
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-py3"
QUEUE_METRIC = "triton_queue_time_us_per_request"
MOUNT = "/models"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
PYTHON_DEPS = ("onnxruntime", "numpy", "pillow")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
STORES = ("s3://", "gs://", "as://", "pvc:")


@dataclass
class DeployConfig:
    """Knobs of the rendered manifests."""

    model_repository: str = "model_repository"
    name: str = "triton"
    namespace: str = "default"
    image: str = DEFAULT_IMAGE
    replicas: int = 2
    min_replicas: int = 1
    max_replicas: int = 8
    model_store: str = ""  # s3://..., gs://..., as://... or pvc:CLAIM ("" -> pvc:<name>-models)
    queue_target_us: int = 50_000  # HPA: average queue time per request to hold
    admin_key: str = ""  # "" -> a fresh random key
    python_deps: bool = True  # install ORT/NumPy/Pillow for python-backend models
    cpu: str = "2"
    memory: str = "4Gi"
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not DNS_LABEL.match(self.name) or not DNS_LABEL.match(self.namespace):
            raise UsageError(
                f"name/namespace must be DNS labels, got {self.name!r}/{self.namespace!r}"
            )
        if not 1 <= self.min_replicas <= self.replicas <= self.max_replicas:
            raise UsageError(
                f"need 1 <= min ({self.min_replicas}) <= replicas ({self.replicas}) "
                f"<= max ({self.max_replicas})"
            )
        if not self.model_store:
            self.model_store = f"pvc:{self.name}-models"
        if not self.model_store.startswith(STORES):
            raise UsageError(
                f"model store must start with one of {STORES}, got {self.model_store!r}"
            )
        if self.queue_target_us < 1:
            raise UsageError("queue_target_us must be >= 1")


@dataclass
class Repository:
    """What the manifests need to know about the published repository."""

    models: list[str]
    gpu: bool  # some model has a KIND_GPU instance group
    python: bool  # some model runs on the python backend
    version_compatible_plans: bool
    digest: str  # sha256 over the configs: a new config rolls the pods


def scan_repository(path: str | Path) -> Repository:
    """Read every ``<model>/config.pbtxt`` (strictly) of a published repository."""
    root = Path(path)
    configs = sorted(root.glob("*/config.pbtxt"))
    if not configs:
        raise FileNotFoundError(f"{root} holds no published model (run `make export` first)")
    digest = hashlib.sha256()
    models, gpu, python = [], False, False
    for cfg_path in configs:
        text = cfg_path.read_text()
        digest.update(cfg_path.parent.name.encode() + b"\0" + text.encode())
        cfg = parse_config(text)
        models.append(cfg_path.parent.name)
        gpu |= any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group)
        python |= cfg.backend == "python"
    vc = any(
        json.loads(p.read_text()).get("version_compatible")
        for p in root.glob("*/[0-9]*/model*.plan.json")
    )
    return Repository(models, gpu, python, vc, digest.hexdigest())


def _labels(cfg: DeployConfig) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": cfg.name,
        "app.kubernetes.io/component": "triton",
        **cfg.labels,
    }


def _meta(cfg: DeployConfig, suffix: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "name": cfg.name + suffix,
        "namespace": cfg.namespace,
        "labels": _labels(cfg),
        **extra,
    }


def server_args(cfg: DeployConfig, repo: Repository) -> list[str]:
    """tritonserver's argv inside the pod (``$(TRITON_ADMIN_KEY)`` is expanded by
    Kubernetes from the container's environment)."""
    store = cfg.model_store if not cfg.model_store.startswith("pvc:") else MOUNT
    args = [
        "tritonserver",
        f"--model-repository={store}",
        "--model-control-mode=explicit",
        *[f"--load-model={m}" for m in repo.models],
        f"--http-port={PORTS['http']}",
        f"--grpc-port={PORTS['grpc']}",
        f"--metrics-port={PORTS['metrics']}",
        "--allow-metrics=true",
        f"--allow-gpu-metrics={'true' if repo.gpu else 'false'}",
        "--exit-timeout-secs=30",
        "--disable-auto-complete-config",
        *auth.server_flags("$(TRITON_ADMIN_KEY)"),
    ]
    if repo.version_compatible_plans:
        args.append("--backend-config=tensorrt,version-compatible=true")
    return args


def _python_deps() -> list[str]:
    """Exact pins of this environment's ONNX Runtime, NumPy and Pillow."""
    return [f"{p}=={importlib.metadata.version(p)}" for p in PYTHON_DEPS]


def container(cfg: DeployConfig, repo: Repository) -> dict[str, Any]:
    """The Triton container: args, ports, probes, key and storage environment."""
    args = server_args(cfg, repo)
    command: list[str] = []
    if repo.python and cfg.python_deps:
        # The NGC image has no ONNX Runtime/Pillow for the python-backend models.
        pins = " ".join(f"'{p}'" for p in _python_deps())
        command = ["/bin/sh", "-c", f'pip install --no-cache-dir {pins} && exec "$@"', "--"]
    env = [
        {
            "name": "TRITON_ADMIN_KEY",
            "valueFrom": {"secretKeyRef": {"name": f"{cfg.name}-admin-key", "key": "admin-key"}},
        }
    ]
    resources: dict[str, Any] = {
        "requests": {"cpu": cfg.cpu, "memory": cfg.memory},
        "limits": {"memory": cfg.memory},
    }
    if repo.gpu:
        resources["limits"]["nvidia.com/gpu"] = 1

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        }

    c: dict[str, Any] = {
        "name": "tritonserver",
        "image": cfg.image,
        "args": args,
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in PORTS.items()],
        "env": env,
        "envFrom": [{"secretRef": {"name": f"{cfg.name}-storage", "optional": True}}],
        "resources": resources,
        # Loading (pip, engines, warmup) may take minutes: liveness starts after this.
        "startupProbe": probe("/v2/health/live", 5, 120),
        "readinessProbe": probe("/v2/health/ready", 5, 3),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if command:
        c["command"] = command
    if cfg.model_store.startswith("pvc:"):
        c["volumeMounts"] = [{"name": "models", "mountPath": MOUNT, "readOnly": True}]
    return c


def deployment(cfg: DeployConfig, repo: Repository) -> dict[str, Any]:
    pod_annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORTS["metrics"]),
        "prometheus.io/path": "/metrics",
        "trainserve/repository-sha256": repo.digest,
    }
    spec: dict[str, Any] = {
        "containers": [container(cfg, repo)],
        "terminationGracePeriodSeconds": 45,  # > --exit-timeout-secs: in-flight requests end
    }
    if cfg.model_store.startswith("pvc:"):
        claim = cfg.model_store[len("pvc:") :]
        spec["volumes"] = [
            {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg),
        "spec": {
            "replicas": cfg.replicas,
            # a new pod counts as available once ready for this long (warmed up)
            "minReadySeconds": 10,
            "selector": {"matchLabels": _labels(cfg)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": _labels(cfg), "annotations": pod_annotations},
                "spec": spec,
            },
        },
    }


def disruption_budget(cfg: DeployConfig) -> dict[str, Any]:
    """At most one replica voluntarily down at a time (node drains, cluster upgrades),
    as the rolling update (``maxUnavailable: 0``) and ``serve run``'s rollouts do."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cfg),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(cfg)}},
    }


def service(cfg: DeployConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg),
        "spec": {
            "type": "ClusterIP",
            "selector": _labels(cfg),
            "ports": [
                {"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in PORTS.items()
            ],
        },
    }


def autoscaler(cfg: DeployConfig) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(cfg),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": cfg.name},
            "minReplicas": cfg.min_replicas,
            "maxReplicas": cfg.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(cfg.queue_target_us),
                        },
                    },
                }
            ],
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }
            },
        },
    }


def adapter_rules(cfg: DeployConfig) -> dict[str, Any]:
    """prometheus-adapter rule: per-pod queue time per request over the last minute."""
    rule = {
        "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
        "resources": {
            "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        },
        "name": {"matches": "nv_inference_queue_duration_us", "as": QUEUE_METRIC},
        "metricsQuery": (
            "sum(rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)"
            " / clamp_min(sum(rate(nv_inference_request_success{<<.LabelMatchers>>}[1m]))"
            " by (<<.GroupBy>>), 1e-9)"
        ),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, "-prometheus-adapter-rules"),
        "data": {"rules.yaml": yaml.safe_dump({"rules": [rule]}, sort_keys=False)},
    }


def service_monitor(cfg: DeployConfig) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(cfg),
        "spec": {
            "selector": {"matchLabels": _labels(cfg)},
            "namespaceSelector": {"matchNames": [cfg.namespace]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def admin_secret(cfg: DeployConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(cfg, "-admin-key"),
        "type": "Opaque",
        "stringData": {"admin-key": cfg.admin_key or auth.new_key()},
    }


def render(cfg: DeployConfig) -> dict[str, list[dict[str, Any]]]:
    """File name -> its documents."""
    repo = scan_repository(cfg.model_repository)
    return {
        "triton.yaml": [
            deployment(cfg, repo),
            disruption_budget(cfg),
            service(cfg),
            autoscaler(cfg),
            adapter_rules(cfg),
            service_monitor(cfg),
        ],
        "secret.yaml": [admin_secret(cfg)],
    }


def write_manifests(cfg: DeployConfig, out: str | Path) -> list[Path]:
    """Render and write the manifests (the Secret readable by the owner only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in render(cfg).items():
        text = yaml.safe_dump_all(docs, sort_keys=False)
        if name == "secret.yaml":  # created 0600, never readable by others
            written.append(auth.write_key_file(out / name, text.rstrip("\n")))
        else:
            written.append(atomic_write_text(out / name, text))
    return written
