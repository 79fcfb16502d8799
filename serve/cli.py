"""Command line: ``python -m serve`` run | classify | models | load | unload | restart |
rollback | health | watchdog | evaluate | bench | soak."""

from __future__ import annotations

import argparse
import json
import os
import sys

from serve.client import DEFAULT_URLS, Classifier, ClientError
from serve.preprocess import ImageError
from serve.triton_server import LOOPBACK, ServerOptions, exec_server, run_supervised


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _url_arg(p: argparse.ArgumentParser, protocols: bool = True) -> None:
    p.add_argument(
        "--url",
        default=None,
        help=f"HOST:PORT (default {DEFAULT_URLS['grpc']} for grpc, "
        f"{DEFAULT_URLS['http']} for http)",
    )
    if protocols:
        p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="Serve the model repository with Triton, operate it, and classify images.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("run", help="run tritonserver in the foreground", formatter_class=fmt)
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument(
        "--host",
        default=LOOPBACK,
        help="address to bind (loopback by default; 0.0.0.0 exposes the server)",
    )
    p.add_argument("--http-port", type=int, default=_env_int("HTTP_PORT", 8000))
    p.add_argument("--grpc-port", type=int, default=_env_int("GRPC_PORT", 8001))
    p.add_argument("--metrics-port", type=int, default=_env_int("METRICS_PORT", 8002))
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument(
        "--watchdog",
        type=float,
        default=float(os.environ.get("WATCHDOG") or 10),
        metavar="SECONDS",
        help="probe the models every SECONDS and restart one whose python-backend stub "
        "died (Triton does not); 0 = no watchdog, exec tritonserver directly",
    )
    p.add_argument("extra", nargs="*", help="more tritonserver flags, after --")

    p = sub.add_parser(
        "classify", help="classify image files with a served model", formatter_class=fmt
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default="antsbees")
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the encoded files to <model>_image (server-side preprocessing)",
    )
    p.add_argument("--version", default="", help="pin a model version (default: latest)")
    _url_arg(p)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="send pixels through system shared memory (server on this machine)",
    )

    p = sub.add_parser("models", help="list models, versions and their state")
    _url_arg(p, protocols=False)
    for name, text in (
        ("load", "load (or reload) a model from the repository"),
        ("unload", "unload a model"),
        ("restart", "unload + load: fresh backend processes (after a crash)"),
        ("rollback", "serve the previous version (`load` undoes it)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        _url_arg(p, protocols=False)

    p = sub.add_parser(
        "watchdog",
        help="restart models whose python-backend stub died (for a server run elsewhere)",
        formatter_class=fmt,
    )
    _url_arg(p, protocols=False)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between rounds")
    p.add_argument("--once", action="store_true", help="one round, print what it did as JSON")

    p = sub.add_parser("health", help="server/model readiness and key Prometheus metrics")
    _url_arg(p, protocols=False)
    p.add_argument(
        "--metrics-url", default=None, help="default http://<url host>:$METRICS_PORT/metrics (8002)"
    )
    p.add_argument("--json", action="store_true")

    sub.add_parser(
        "soak", add_help=False, help="sustained mixed load: failures and memory growth (soak -h)"
    )
    sub.add_parser(
        "bench", add_help=False, help="throughput/latency sweep vs in-process baselines (bench -h)"
    )
    p = sub.add_parser(
        "evaluate", help="served accuracy on a labelled ImageFolder split", formatter_class=fmt
    )
    p.add_argument("--model", default="antsbees_image")
    p.add_argument("--data", required=True, help="a folder of <class>/<image> (e.g. .../val)")
    p.add_argument("--version", default="")
    _url_arg(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--confusion", default="", help="confusion matrix PNG path")
    p.add_argument("--json", action="store_true")
    return parser


def run_classify(a: argparse.Namespace) -> int:
    model = a.model if not a.raw or a.model.endswith("_image") else f"{a.model}_image"
    failed = 0
    with Classifier(
        a.url,
        model,
        protocol=a.protocol,
        version=a.version,
        max_batch=a.batch_size,
        shared_memory=a.shared_memory,
    ) as clf:
        for path, result in zip(a.images, clf.classify_each(a.images, a.top_k), strict=True):
            if isinstance(result, Exception):
                print(f"error: {result}", file=sys.stderr)
                failed += 1
            elif a.json:
                print(
                    json.dumps(
                        {
                            "image": path,
                            "model": model,
                            "predictions": [
                                {"label": p.label, "probability": p.probability, "index": p.index}
                                for p in result
                            ],
                        }
                    )
                )
            else:
                ranked = "  ".join(f"{p.label} {p.probability:.4f}" for p in result)
                print(f"{path}: {ranked}")
    return 1 if failed else 0


def run_admin(a: argparse.Namespace) -> int:
    from serve import admin

    if a.command == "models":
        for m in admin.list_models(a.url):
            print(
                f"{m.name:32s} {m.version or '-':>4s}  {m.state}"
                + (f"  ({m.reason})" if m.reason else "")
            )
    elif a.command == "load":
        admin.load(a.url, a.model)
        print(f"loaded {a.model}: versions {admin.ready_versions(a.url, a.model)}")
    elif a.command == "unload":
        admin.unload(a.url, a.model)
        print(f"unloaded {a.model}")
    elif a.command == "restart":
        admin.restart(a.url, a.model)
        print(f"restarted {a.model}: versions {admin.ready_versions(a.url, a.model)}")
    else:
        old, new = admin.rollback(a.url, a.model)
        print(
            f"rolled back {a.model}: version {old} -> {new} "
            f"(`python -m serve load {a.model}` restores the repository's policy)"
        )
    return 0


def run_health(a: argparse.Namespace) -> int:
    from serve import admin

    host = (a.url or DEFAULT_URLS["grpc"]).rsplit(":", 1)[0]
    metrics_url = a.metrics_url or f"http://{host}:{_env_int('METRICS_PORT', 8002)}/metrics"
    h = admin.health(a.url, metrics_url)
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
        print(
            f"{m['model']:28s} {m['version'] or '-':>4s} {m['state']:10s} "
            f"{m['success']:8.0f} {m['failure']:7.0f} {m['avg_queue_ms']:9.2f} "
            f"{m['avg_compute_ms']:10.2f} {m['avg_batch']:9.2f}"
        )
    return 0 if h["ready"] else 1


def run_evaluate(a: argparse.Namespace) -> int:
    from serve.evaluate import evaluate_served
    from serve.plots import plot_confusion

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
            print(f"error: {path}: {err}", file=sys.stderr)
        print(f"top-1: {100 * ev.accuracy:.2f}%")
    return 1 if ev.errors else 0


def run_watchdog(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from serve import watchdog

    cfg = watchdog.WatchdogConfig(url=a.url or DEFAULT_URLS["grpc"], interval=a.interval)
    if not a.once:
        return watchdog.main_loop(cfg)
    log = watchdog.stderr_log
    print(json.dumps(asdict(watchdog.check_once(cfg, log)), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch; errors print one clear line and exit non-zero."""
    argv = list(__import__("sys").argv[1:] if argv is None else argv)
    if argv and argv[0] in ("bench", "soak"):  # own parsers (python -m serve bench -h)
        from serve import bench, soak

        return (bench if argv[0] == "bench" else soak).main(argv[1:])
    a = build_parser().parse_args(argv)
    try:
        if a.command == "run":
            opts = ServerOptions(
                model_repository=a.model_repository,
                host=a.host,
                http_port=a.http_port,
                grpc_port=a.grpc_port,
                metrics_port=a.metrics_port,
                log_verbose=a.log_verbose,
                extra_args=list(a.extra),
            )
            if a.watchdog > 0:
                return run_supervised(opts, a.watchdog)
            exec_server(opts)
            return 0  # not reached: exec
        if a.command == "watchdog":
            return run_watchdog(a)
        if a.command == "classify":
            return run_classify(a)
        if a.command == "health":
            return run_health(a)
        if a.command == "evaluate":
            return run_evaluate(a)
        return run_admin(a)
    except (ClientError, ImageError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
