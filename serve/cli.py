"""Command line: ``python -m serve run`` (Triton in the foreground) and ``... classify``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from serve.client import DEFAULT_URLS, Classifier, ClientError
from serve.preprocess import ImageError
from serve.triton_server import LOOPBACK, ServerOptions, exec_server


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run tritonserver in the foreground on the model repository",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    p.add_argument("extra", nargs="*", help="more tritonserver flags, after --")


def add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="classify image files with a served model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default="antsbees")
    p.add_argument("--version", default="", help="model version (default: the server's choice)")
    p.add_argument(
        "--url",
        default=None,
        help=f"HOST:PORT (default {DEFAULT_URLS['grpc']} for grpc, "
        f"{DEFAULT_URLS['http']} for http)",
    )
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.add_argument("--json", action="store_true", help="one JSON object per image")


def run_server(a: argparse.Namespace) -> int:
    exec_server(
        ServerOptions(
            model_repository=a.model_repository,
            host=a.host,
            http_port=a.http_port,
            grpc_port=a.grpc_port,
            metrics_port=a.metrics_port,
            log_verbose=a.log_verbose,
            extra_args=list(a.extra),
        )
    )
    return 0  # not reached: exec


def run_classify(a: argparse.Namespace) -> int:
    failed = 0
    with Classifier(
        a.url, a.model, protocol=a.protocol, version=a.version, max_batch=a.batch_size
    ) as clf:
        # Decode every image first: a bad file is reported by name and the rest still run.
        good, pixels = [], []
        for path in a.images:
            try:
                pixels.append(clf.preprocess([path])[0])
                good.append(path)
            except ImageError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
        if pixels:
            import numpy as np

            results = clf.classify_pixels(np.stack(pixels), a.top_k)
            for path, preds in zip(good, results, strict=True):
                if a.json:
                    print(
                        json.dumps(
                            {
                                "image": path,
                                "predictions": [
                                    {
                                        "label": p.label,
                                        "probability": p.probability,
                                        "index": p.index,
                                    }
                                    for p in preds
                                ],
                            }
                        )
                    )
                else:
                    ranked = "  ".join(f"{p.label} {p.probability:.4f}" for p in preds)
                    print(f"{path}: {ranked}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m serve {run,classify}``; errors print one clear line and exit non-zero."""
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="Serve the model repository with Triton and classify images against it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_run(sub)
    add_classify(sub)
    a = parser.parse_args(argv)
    try:
        if a.command == "run":
            return run_server(a)
        return run_classify(a)
    except (ClientError, ImageError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
