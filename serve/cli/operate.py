"""The operator's commands of ``python -m serve``: models, load, unload, restart, rollback,
health and the watchdog (control-plane calls with the admin key)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from serve.client.connect import DEFAULT_URLS
from serve.core import auth
from serve.core.cli_common import (
    add_admin_key,
    add_url,
    env_int,
)

log = logging.getLogger("serve.cli")


def resolve_admin_key(a: argparse.Namespace) -> str | None:
    """The admin key for ``a.url`` (or the default gRPC URL), from ``--admin-key-file``
    or where ``serve run`` wrote it."""
    return auth.resolve_key(a.url or DEFAULT_URLS["grpc"], a.admin_key_file)


def add_admin_arguments(
    p: argparse.ArgumentParser, model: bool = True, protocols: bool = False
) -> None:
    if model:
        p.add_argument("model", help="the model's name in the repository")
    add_url(p, protocols=protocols)
    add_admin_key(p)


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    add_admin_arguments(p, model=False, protocols=True)
    p.add_argument(
        "--model-repository",
        default="model_repository",
        help="where each version's model card is read, when this machine has it: its "
        "precision, accuracy and parity (default: model_repository)",
    )


def version_facts(repo: Path, model: str, version: str) -> str:
    """What a published version's card says: precision, parity, accuracy ("" when the
    card is not on this machine)."""
    from serve.core.card import ModelCard
    from serve.core.card_reader import CardError

    path = repo / model / version / "model_card.json"
    if not version.isdigit() or not path.is_file():
        return ""
    try:
        card = ModelCard.read(path)
    except CardError:
        return "card unreadable"
    facts = [card.precision]
    if card.parity is not None:
        facts.append("parity passed" if card.parity.passed else "parity FAILED")
        if card.parity.reference_accuracy is not None:
            facts.append(f"val acc {100 * card.parity.reference_accuracy:.2f}%")
    if card.published:
        facts.append(f"published {card.published[:16]}")
    return ", ".join(facts)


def run_models(a: argparse.Namespace) -> int:
    from serve.client import admin

    protocol = getattr(a, "protocol", "grpc")
    url = a.url or DEFAULT_URLS[protocol]
    repo = Path(a.model_repository)
    for m in admin.list_models(url, auth.resolve_key(url, a.admin_key_file), protocol):
        reason = f"  ({m.reason})" if m.reason else ""
        facts = version_facts(repo, m.name, m.version)
        print(f"{m.name:32s} {m.version or '-':>4s}  {m.state:10s}{reason}  {facts}".rstrip())
    return 0


def run_model_op(a: argparse.Namespace) -> int:
    from serve.client import admin

    key = resolve_admin_key(a)
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
    p.add_argument("--json", action="store_true", help="print the health report as JSON")


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
    if h["replicas"]:
        print(f"\n{'replica':8s} {'address':22s} {'state':8s} {'in flight':>9s} {'requests':>9s}")
        for r in h["replicas"]:
            print(
                f"{r['name']:8s} {r['address']:22s} {r['state']:8s} {r['in_flight']:9d} "
                f"{r['requests']:9d}"
            )
        up = sum(r["state"] == "UP" for r in h["replicas"])
        print(f"{up} of {len(h['replicas'])} replicas in rotation")
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
        admin_key=resolve_admin_key(a),
    )
    if not a.once:
        return watchdog.main_loop(cfg)
    print(json.dumps(asdict(watchdog.check_once(cfg)), indent=2))
    return 0
