"""``python -m serve classify`` and ``evaluate``: images through a served model."""

from __future__ import annotations

import argparse
import json
import logging

from serve.cli.operate import resolve_admin_key
from serve.client.client import Classifier
from serve.core.cli_common import (
    add_admin_key,
    add_url,
)
from serve.core.names import image_model_name

log = logging.getLogger("serve.cli")


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    p.add_argument("--model", default="antsbees", help="served model (with --raw: <model>_image)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the encoded files to <model>_image (server-side preprocessing)",
    )
    p.add_argument("--version", default="", help="pin a model version (default: latest)")
    add_url(p)
    p.add_argument("--top-k", type=int, default=2, help="most likely classes shown per image")
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
        admin_key=resolve_admin_key(a) if a.shared_memory else None,
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
                answer = {"image": path, "model": model, "version": clf.last_version}
                print(json.dumps({**answer, "predictions": preds}))
            else:
                ranked = "  ".join(f"{p.label} {p.probability:.4f}" for p in result)
                print(f"{path}: {ranked}")
    if failed:
        log.error("%d of %d images failed", failed, len(a.images))
    return 1 if failed else 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="antsbees_image",
        help="served model: <name>_image takes the files, <name> pixels preprocessed here",
    )
    p.add_argument("--data", required=True, help="a folder of <class>/<image> (e.g. .../val)")
    p.add_argument("--version", default="", help="pin a model version (default: latest)")
    add_url(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    p.add_argument("--confusion", default="", help="confusion matrix PNG path")
    p.add_argument(
        "--json", action="store_true", help="print accuracy, per-class and confusion as JSON"
    )


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
