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
from serve.core.flags import Flag, add_flags, build

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


MANIFEST_FLAGS = [
    Flag("name", "--name", "name of the Deployment, Service, HPA and the rest (a DNS label)"),
    Flag("namespace", "--namespace", "Kubernetes namespace of every object"),
    Flag(
        "image",
        "--image",
        "Triton image (default 26.07: the first release clear of every published "
        "Triton security bulletin; CUDA 13.3.1, needs a driver for CUDA 13.3)",
    ),
    Flag("replicas", "--replicas", "the Deployment's Triton pods at start"),
    Flag("min_replicas", "--min-replicas", "HPA: fewest pods"),
    Flag("max_replicas", "--max-replicas", "HPA: most pods"),
    Flag(
        "model_store",
        "--model-store",
        "s3://bucket/path (gs://, as://) read by Triton, or pvc:CLAIM mounted "
        "read-only (default pvc:<name>-models); copy the repository there first",
    ),
    Flag(
        "queue_target_us",
        "--queue-target-us",
        "HPA target: average queue time per request (microseconds) per pod",
    ),
]
PYTHON_DEPS_FLAG = Flag(
    "python_deps",
    "--no-python-deps",
    "the image already has ONNX Runtime, NumPy and Pillow (CPU repositories)",
)


def add_manifests_arguments(p: argparse.ArgumentParser) -> None:
    from serve.deploy.k8s import DeployConfig

    add_model_repository(p)
    p.add_argument("--out", default="deploy/k8s", help="folder for triton.yaml and secret.yaml")
    add_flags(p, DeployConfig, MANIFEST_FLAGS)
    p.add_argument(
        "--admin-key-file",
        default=None,
        metavar="FILE",
        help="put this key in the Secret (default: a fresh random key)",
    )
    add_flags(p, DeployConfig, [PYTHON_DEPS_FLAG])


def run_manifests(a: argparse.Namespace) -> int:
    from serve.deploy.k8s import DeployConfig, write_manifests

    cfg = build(
        DeployConfig,
        a,
        [*MANIFEST_FLAGS, PYTHON_DEPS_FLAG],
        model_repository=a.model_repository,
        admin_key=auth.read_key_file(Path(a.admin_key_file)) if a.admin_key_file else "",
    )
    for path in write_manifests(cfg, a.out):
        print(f"wrote {path}")
    print(f"apply: kubectl apply -f {a.out}/ (model repository: {cfg.model_store})")
    return 0
