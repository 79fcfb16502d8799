"""The measuring and deploying commands of ``python -m serve``: bench, soak, manifests and
perf-analyzer (each imports its tool only when used)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from serve.core import auth
from serve.core.cli_common import (
    add_model_repository,
)

log = logging.getLogger("serve.cli")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from serve.tools.bench import add_arguments

    add_arguments(p)


def run_bench(a: argparse.Namespace) -> int:
    from serve.tools.bench import main

    return main(a)


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    from serve.tools.soak import add_arguments

    add_arguments(p)


def run_soak_command(a: argparse.Namespace) -> int:
    from serve.tools.soak import run

    return run(a)


def perf_analyzer_module():  # noqa: ANN202 - the module, imported only when the command is used
    from serve.tools import perf_analyzer

    return perf_analyzer


def add_manifests_arguments(p: argparse.ArgumentParser) -> None:
    from serve.deploy.k8s import DEFAULT_IMAGE, DeployConfig

    d = DeployConfig.__dataclass_fields__
    add_model_repository(p)
    p.add_argument("--out", default="deploy/k8s", help="folder for triton.yaml and secret.yaml")
    p.add_argument("--name", default=d["name"].default)
    p.add_argument("--namespace", default=d["namespace"].default)
    p.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        help="Triton image (default 26.07: the first release clear of every published "
        "Triton security bulletin; CUDA 13.3.1, needs a driver for CUDA 13.3)",
    )
    p.add_argument("--replicas", type=int, default=d["replicas"].default)
    p.add_argument("--min-replicas", type=int, default=d["min_replicas"].default)
    p.add_argument("--max-replicas", type=int, default=d["max_replicas"].default)
    p.add_argument(
        "--model-store",
        default="",
        help="s3://bucket/path (gs://, as://) read by Triton, or pvc:CLAIM mounted "
        "read-only (default pvc:<name>-models); copy the repository there first",
    )
    p.add_argument(
        "--queue-target-us",
        type=int,
        default=d["queue_target_us"].default,
        help="HPA target: average queue time per request (microseconds) per pod",
    )
    p.add_argument(
        "--admin-key-file",
        default=None,
        metavar="FILE",
        help="put this key in the Secret (default: a fresh random key)",
    )
    p.add_argument(
        "--no-python-deps",
        dest="python_deps",
        action="store_false",
        help="the image already has ONNX Runtime, NumPy and Pillow (CPU repositories)",
    )


def run_manifests(a: argparse.Namespace) -> int:
    from serve.deploy.k8s import DeployConfig, write_manifests

    cfg = DeployConfig(
        model_repository=a.model_repository,
        name=a.name,
        namespace=a.namespace,
        image=a.image,
        replicas=a.replicas,
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        model_store=a.model_store,
        queue_target_us=a.queue_target_us,
        admin_key=auth.read_key_file(Path(a.admin_key_file)) if a.admin_key_file else "",
        python_deps=a.python_deps,
    )
    for path in write_manifests(cfg, a.out):
        print(f"wrote {path}")
    print(f"apply: kubectl apply -f {a.out}/ (model repository: {cfg.model_store})")
    return 0
