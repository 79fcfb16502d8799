"""Command line: ``python -m serve`` run | classify | evaluate | models | load | unload |
restart | rollback | health | watchdog | bench | soak | manifests (torch-free)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from serve.client.client import Classifier
from serve.client.connect import DEFAULT_URLS
from serve.core import auth
from serve.core.cli_common import (
    Command,
    add_admin_key,
    add_model_repository,
    add_url,
    env_int,
)
from serve.core.cli_common import main as cli_main
from serve.core.contract import image_model_name
from serve.runtime.stack import FrontLimits
from serve.runtime.triton_server import LOOPBACK, ServerOptions, exec_server, run_supervised

log = logging.getLogger(__name__)


def _key(a: argparse.Namespace) -> str | None:
    return auth.resolve_key(a.url or DEFAULT_URLS["grpc"], a.admin_key_file)


# -- run ---------------------------------------------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_model_repository(p)
    p.add_argument(
        "--host",
        default=LOOPBACK,
        help="address to bind (loopback by default; 0.0.0.0 exposes the server)",
    )
    p.add_argument("--http-port", type=int, default=env_int("HTTP_PORT", 8000))
    p.add_argument("--grpc-port", type=int, default=env_int("GRPC_PORT", 8001))
    p.add_argument("--metrics-port", type=int, default=env_int("METRICS_PORT", 8002))
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument(
        "--watchdog",
        type=float,
        default=float(env_int("WATCHDOG", 10)),
        metavar="SECONDS",
        help="probe the models every SECONDS and restart one whose python-backend stub "
        "died or hangs (Triton does not); 0 = no watchdog, exec tritonserver directly",
    )
    p.add_argument(
        "--admin-key-file",
        default=None,
        metavar="FILE",
        help="the key of the control APIs (load/unload, shared memory, statistics, trace, "
        "logging); default $TRAINSERVE_ADMIN_KEY, else a new random key. It is written "
        "(mode 0600) where this project's clients find it",
    )
    p.add_argument(
        "--unrestricted",
        action="store_true",
        help="leave the control APIs open to anyone who reaches the port (loopback only)",
    )
    p.add_argument(
        "--jemalloc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="preload libjemalloc.so.2 (default: when installed)",
    )
    f = p.add_argument_group(
        "the public front (HAProxy; serve/runtime/front.py)",
        "the public ports belong to HAProxy; tritonserver runs in a private network "
        "namespace that only the front reaches",
    )
    f.add_argument(
        "--no-front",
        action="store_true",
        help="serve tritonserver's own ports directly (loopback only; its frontend has "
        "known crash bugs - for debugging)",
    )
    f.add_argument(
        "--max-body-bytes",
        type=int,
        default=0,
        help="largest request body; 0 = sized from the repository (max batch x input size)",
    )
    f.add_argument("--max-json-bytes", type=int, default=FrontLimits.max_json_bytes)
    f.add_argument("--max-json-depth", type=int, default=FrontLimits.max_json_depth)
    f.add_argument("--max-connections", type=int, default=FrontLimits.max_connections)
    f.add_argument(
        "--max-per-client",
        type=int,
        default=FrontLimits.max_per_client,
        help="concurrent requests per client address",
    )
    f.add_argument(
        "--max-queue",
        type=int,
        default=FrontLimits.max_queue,
        help="requests inside Triton at once (running or queued); more are refused at "
        "once (503 / gRPC UNAVAILABLE). Replaces Triton's queue policy, which stalls 2.51",
    )
    f.add_argument(
        "--max-queue-bytes",
        type=int,
        default=FrontLimits.max_queue_bytes,
        help="request bytes inside Triton at once: half for --max-queue requests up to "
        "(this / 2 / --max-queue) bytes each, half for a few large ones (batches), each "
        "up to --max-body-bytes; more are refused as server busy",
    )
    f.add_argument("--idle-timeout", type=float, default=FrontLimits.idle_timeout_s)
    f.add_argument("--request-timeout", type=float, default=FrontLimits.request_timeout_s)
    f.add_argument("--tls-cert", default="", help="PEM certificate: TLS on HTTP and gRPC")
    f.add_argument("--tls-key", default="", help="PEM private key of --tls-cert (mode 0600)")
    f.add_argument(
        "--inference-key-file",
        default=None,
        metavar="FILE",
        help="inference and metadata need this key too (header inference-key)",
    )
    f.add_argument(
        "--private",
        choices=("auto", "namespace", "loopback"),
        default="auto",
        help="where Triton listens: its own network namespace (auto: when possible) or "
        "loopback ports (reachable by local users)",
    )
    p.add_argument("extra", nargs="*", help="more tritonserver flags, after --")


def front_limits(a: argparse.Namespace) -> FrontLimits:
    """The front's limits from ``serve run``'s flags."""
    inference_key = auth.read_key_file(Path(a.inference_key_file)) if a.inference_key_file else ""
    return FrontLimits(
        max_body_bytes=a.max_body_bytes,
        max_json_bytes=a.max_json_bytes,
        max_json_depth=a.max_json_depth,
        max_connections=a.max_connections,
        max_per_client=a.max_per_client,
        max_queue=a.max_queue,
        max_queue_bytes=a.max_queue_bytes,
        idle_timeout_s=a.idle_timeout,
        request_timeout_s=a.request_timeout,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        inference_key=inference_key,
        private=a.private,
    )


def run_run(a: argparse.Namespace) -> int:
    key = auth.read_key_file(Path(a.admin_key_file)) if a.admin_key_file else ""
    opts = ServerOptions(
        model_repository=a.model_repository,
        host=a.host,
        http_port=a.http_port,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        log_verbose=a.log_verbose,
        extra_args=list(a.extra),
        restricted=not a.unrestricted,
        admin_key=key,
        jemalloc=a.jemalloc,
    )
    if not a.no_front:
        from serve.runtime.front import find_haproxy
        from serve.runtime.stack import PublicServer

        find_haproxy()  # refuse early, naming the fix
        limits = front_limits(a)
        server = PublicServer(opts, limits, inherit_output=True)
        return run_supervised(opts, a.watchdog, server=server)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.error("--no-front serves Triton's own ports: loopback only (got --host %s)", a.host)
        return 2
    log.warning(
        "WARNING: --no-front: tritonserver 2.51's own ports are served directly. Its "
        "frontend crashes on some request bodies (deep JSON, gzip bombs, chunked floods) "
        "and has no idle timeout or connection cap; its admin key is in its argv. "
        "Loopback only, for debugging."
    )
    if a.watchdog > 0:
        return run_supervised(opts, a.watchdog)
    exec_server(opts)
    return 0  # not reached: exec


# -- classify / evaluate -----------------------------------------------------------------
def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default="antsbees")
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the encoded files to <model>_image (server-side preprocessing)",
    )
    p.add_argument("--version", default="", help="pin a model version (default: latest)")
    add_url(p)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="send pixels through system shared memory (server on this machine; "
        "registering needs the admin key)",
    )
    add_admin_key(p)


def run_classify(a: argparse.Namespace) -> int:
    """Answers every good image and names every bad one; exit 1 when any failed."""
    model = a.model if not a.raw or a.model.endswith("_image") else image_model_name(a.model)
    failed = 0
    with Classifier(
        a.url,
        model,
        protocol=a.protocol,
        version=a.version,
        max_batch=a.batch_size,
        timeout=a.timeout,
        shared_memory=a.shared_memory,
        admin_key=_key(a) if a.shared_memory else None,
    ) as clf:
        for path, result in zip(a.images, clf.classify_each(a.images, a.top_k), strict=True):
            if isinstance(result, Exception):
                log.error("error: %s", result)
                failed += 1
            elif a.json:
                preds = [
                    {"label": p.label, "probability": p.probability, "index": p.index}
                    for p in result
                ]
                print(json.dumps({"image": path, "model": model, "predictions": preds}))
            else:
                ranked = "  ".join(f"{p.label} {p.probability:.4f}" for p in result)
                print(f"{path}: {ranked}")
    if failed:
        log.error("%d of %d images failed", failed, len(a.images))
    return 1 if failed else 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="antsbees_image")
    p.add_argument("--data", required=True, help="a folder of <class>/<image> (e.g. .../val)")
    p.add_argument("--version", default="")
    add_url(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--confusion", default="", help="confusion matrix PNG path")
    p.add_argument("--json", action="store_true")


def run_evaluate(a: argparse.Namespace) -> int:
    from serve.client.evaluate import evaluate_served
    from serve.core.plots import plot_confusion

    with Classifier(
        a.url, a.model, protocol=a.protocol, version=a.version, max_batch=a.batch_size
    ) as clf:
        ev = evaluate_served(clf, a.data, a.batch_size)
    if a.confusion:
        plot_confusion(
            ev.confusion(), ev.classes, a.confusion, f"{a.model} served: {ev.accuracy:.2%}"
        )
    if a.json:
        print(json.dumps(ev.to_dict(), indent=2))
    else:
        for name, acc in ev.per_class().items():
            n = int((ev.targets == ev.classes.index(name)).sum())
            print(f"{name:>20s}: {100 * acc:6.2f}%  ({n} images)")
        for path, err in ev.errors.items():
            log.error("error: %s: %s", path, err)
        print(f"top-1: {100 * ev.accuracy:.2f}%")
    return 1 if ev.errors else 0


# -- operations --------------------------------------------------------------------------
def add_admin_arguments(
    p: argparse.ArgumentParser, model: bool = True, protocols: bool = False
) -> None:
    if model:
        p.add_argument("model")
    add_url(p, protocols=protocols)
    add_admin_key(p)


def run_models(a: argparse.Namespace) -> int:
    from serve.client import admin

    protocol = getattr(a, "protocol", "grpc")
    url = a.url or DEFAULT_URLS[protocol]
    for m in admin.list_models(url, auth.resolve_key(url, a.admin_key_file), protocol):
        reason = f"  ({m.reason})" if m.reason else ""
        print(f"{m.name:32s} {m.version or '-':>4s}  {m.state}{reason}")
    return 0


def run_model_op(a: argparse.Namespace) -> int:
    from serve.client import admin

    key = _key(a)
    if a.command == "load":
        admin.load(a.url, a.model, key=key)
        print(f"loaded {a.model}: versions {admin.ready_versions(a.url, a.model, key)}")
    elif a.command == "unload":
        admin.unload(a.url, a.model, key)
        print(f"unloaded {a.model}")
    elif a.command == "restart":
        how = admin.restart(a.url, a.model, key)
        print(f"restarted {a.model} ({how}): versions {admin.ready_versions(a.url, a.model, key)}")
    else:
        old, new = admin.rollback(a.url, a.model, key)
        print(
            f"rolled back {a.model}: version {old} -> {new} "
            f"(`python -m serve load {a.model}` restores the repository's policy)"
        )
    return 0


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    add_admin_arguments(p, model=False, protocols=True)
    p.add_argument(
        "--metrics-url",
        default=None,
        help="the server's Prometheus URL; default: what `serve run` recorded for --url, "
        "else :$METRICS_PORT for a server on the default ports, else unknown",
    )
    p.add_argument("--json", action="store_true")


def run_health(a: argparse.Namespace) -> int:
    from serve.client import admin

    url = a.url or DEFAULT_URLS[a.protocol]
    metrics_url = a.metrics_url or auth.metrics_url(url, env_int("METRICS_PORT", 8002))
    h = admin.health(url, metrics_url, auth.resolve_key(url, a.admin_key_file), a.protocol)
    if a.json:
        print(json.dumps(h, indent=2))
        return 0 if h["ready"] else 1
    print(f"server live: {h['live']}  ready: {h['ready']}")
    if h["metrics_error"]:
        print(h["metrics_error"])
    print(
        f"{'model':28s} {'ver':>4s} {'state':10s} {'ok':>8s} {'failed':>7s} "
        f"{'queue ms':>9s} {'compute ms':>10s} {'avg batch':>9s}"
    )
    for m in h["models"]:
        if m["success"] is None:  # metrics unknown: say so instead of zeros
            print(f"{m['model']:28s} {m['version'] or '-':>4s} {m['state']:10s} {'unknown':>8s}")
            continue
        print(
            f"{m['model']:28s} {m['version'] or '-':>4s} {m['state']:10s} "
            f"{m['success']:8.0f} {m['failure']:7.0f} {m['avg_queue_ms']:9.2f} "
            f"{m['avg_compute_ms']:10.2f} {m['avg_batch']:9.2f}"
        )
    return 0 if h["ready"] else 1


def add_watchdog_arguments(p: argparse.ArgumentParser) -> None:
    add_admin_arguments(p, model=False)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between rounds")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per probe")
    p.add_argument("--hung-rounds", type=int, default=3, help="timed-out rounds before a restart")
    p.add_argument("--once", action="store_true", help="one round, print what it did as JSON")


def run_watchdog(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from serve.runtime import watchdog

    cfg = watchdog.WatchdogConfig(
        url=a.url or DEFAULT_URLS["grpc"],
        interval=a.interval,
        timeout=a.timeout,
        hung_rounds=a.hung_rounds,
        admin_key=_key(a),
    )
    if not a.once:
        return watchdog.main_loop(cfg)
    print(json.dumps(asdict(watchdog.check_once(cfg)), indent=2))
    return 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from serve.tools.bench import add_arguments

    add_arguments(p)


def _bench(a: argparse.Namespace) -> int:
    from serve.tools.bench import main

    return main(a)


def _soak_arguments(p: argparse.ArgumentParser) -> None:
    from serve.tools.soak import add_arguments

    add_arguments(p)


def _soak(a: argparse.Namespace) -> int:
    from serve.tools.soak import run

    return run(a)


COMMANDS = [
    Command("run", "run tritonserver in the foreground", add_run_arguments, run_run),
    Command(
        "classify",
        "classify image files with a served model",
        add_classify_arguments,
        run_classify,
    ),
    Command(
        "evaluate",
        "served accuracy on a labelled ImageFolder split",
        add_evaluate_arguments,
        run_evaluate,
    ),
    Command(
        "models",
        "list models, versions and their state",
        lambda p: add_admin_arguments(p, model=False, protocols=True),
        run_models,
    ),
    Command(
        "load", "load (or reload) a model from the repository", add_admin_arguments, run_model_op
    ),
    Command("unload", "unload a model", add_admin_arguments, run_model_op),
    Command(
        "restart",
        "fresh backend processes for a model (after a crash or hang)",
        add_admin_arguments,
        run_model_op,
    ),
    Command(
        "rollback",
        "serve the previous version (`load` undoes it)",
        add_admin_arguments,
        run_model_op,
    ),
    Command(
        "health",
        "server/model readiness and key Prometheus metrics",
        add_health_arguments,
        run_health,
    ),
    Command(
        "watchdog",
        "restart models whose python-backend stub died or hangs (for a server run elsewhere)",
        add_watchdog_arguments,
        run_watchdog,
    ),
    Command(
        "bench", "throughput/latency sweep vs in-process ONNX Runtime", _bench_arguments, _bench
    ),
    Command("soak", "sustained mixed load: failures and memory growth", _soak_arguments, _soak),
    Command(
        "manifests",
        "Kubernetes manifests for N Tritons serving the repository (make deploy-manifests)",
        lambda p: _manifests_arguments(p),
        lambda a: _manifests(a),
    ),
    Command(
        "perf-analyzer",
        "install or check Triton's perf_analyzer in this venv (make setup installs it)",
        lambda p: _perf_analyzer().add_arguments(p),
        lambda a: _perf_analyzer().run_command(a),
    ),
]


def _perf_analyzer():  # noqa: ANN202 - the module, imported only when the command is used
    from serve.tools import perf_analyzer

    return perf_analyzer


# -- manifests -----------------------------------------------------------------------------
def _manifests_arguments(p: argparse.ArgumentParser) -> None:
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


def _manifests(a: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serve COMMAND ...``; errors print one clear line (exit 2)."""
    return cli_main(
        "python -m serve",
        "Serve the model repository with Triton, operate it, and classify images.",
        COMMANDS,
        argv,
    )
