"""``python -m serve chaos`` (``make chaos``): no request fails when a replica dies or a
version is rolled out (torch-free).

On a stack of its own (``serve run``'s: the front, ``--replicas`` tritonservers in their
private namespace) over a scratch copy of the model repository, a closed-loop load of
mixed tensor and raw-image gRPC requests runs at ``--concurrency`` for ``--seconds``,
while every ``--kill-every`` seconds a random tritonserver is killed with SIGKILL, and
once a new version is published (the latest version copied as the next one) and rolled
out, and later rolled back (``serve.client.admin``: one replica at a time). Every request
is recorded: when it was sent and answered, whether it failed and why, which version
answered. The report (JSON + a PNG timeline) says how many were sent, answered and
failed (by reason), p50/p99 outside and during faults (from a kill until every replica
is back in rotation), and how long each kill took to come back to full capacity.
Targets: with 2 replicas, no failed request through the kills and the rollout; with 1,
failures only inside the restart window, and the restart ready within 10 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from serve.core.files import atomic_write_json, latest_version
from serve.core.flags import Flag, add_flags, build
from serve.core.names import IMAGE_INPUT, INPUT_NAME, image_model_name

log = logging.getLogger(__name__)

RESTART_TARGET_S = 10.0


@dataclass(frozen=True)
class ChaosConfig:
    """What ``python -m serve chaos`` runs, and for how long."""

    model: str = "antsbees"
    model_repository: str = "model_repository"
    data: str = ""  # required on the command line
    replicas: int = 2
    seconds: float = 60.0
    kill_every: float = 15.0
    concurrency: int = 4
    rollout: bool = True
    seed: int = 0
    out: str = "bench/local"


CHAOS_FLAGS = [
    Flag("model", "--model", "the classifier under load (and its <model>_image)"),
    Flag("model_repository", "--model-repository", "Triton model repository (a copy is served)"),
    Flag("data", "--data", "ImageFolder split with images to send (.../val)", {"required": True}),
    Flag("replicas", "--replicas", "local tritonservers behind the front"),
    Flag("seconds", "--seconds", "how long the load runs"),
    Flag("kill_every", "--kill-every", "seconds between SIGKILLs of a random tritonserver"),
    Flag("concurrency", "--concurrency", "requests in flight (closed loop)"),
    Flag("rollout", "--rollout", "publish a new version, roll it out, then roll it back"),
    Flag("seed", "--seed", "which tritonserver each kill picks"),
    Flag("out", "--out", "where the report goes"),
]


@dataclass
class Sent:
    """One request: when, how long, and how it ended."""

    start: float
    seconds: float
    kind: Literal["tensor", "raw"]
    ok: bool
    version: str = ""
    error: str = ""


@dataclass
class Event:
    """A fault or an operation, on the run's clock."""

    at: float
    what: str
    detail: str = ""
    until: float | None = None  # a fault's window: until every replica is back in rotation


@dataclass
class Run:
    """What the run recorded, and its stop signal."""

    sent: list[Sent] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def scratch_repository(repo: Path, work: Path) -> Path:
    """A copy of ``repo`` to publish into (version folders and files linked, configs
    copied), so the user's repository is never changed."""
    dst = work / "repository"
    if dst.exists():
        shutil.rmtree(dst)
    for model_dir in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
        target = dst / model_dir.name
        target.mkdir(parents=True)
        for entry in model_dir.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, target / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, target / entry.name)
    return dst


def publish_copy(repo: Path, model: str) -> int:
    """The latest version of ``model`` copied as the next one (a new version to roll
    out, the same weights); the new version number."""
    latest = latest_version(repo / model)
    new = latest.parent / str(int(latest.name) + 1)
    staging = latest.parent / f".{new.name}.staging"
    shutil.copytree(latest, staging, symlinks=True)
    os.rename(staging, new)
    return int(new.name)


def _load(run: Run, cfg: ChaosConfig, url: str, pixels: np.ndarray, image: bytes, k: int) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    raw = grpcclient.InferInput(IMAGE_INPUT, [1, 1], "BYTES")
    raw.set_data_from_numpy(np.array([[image]], dtype=object))
    n = k
    try:
        while not run.stop.is_set():
            kind: Literal["tensor", "raw"] = "tensor" if n % 2 == 0 else "raw"
            n += 1
            start = time.monotonic()
            try:
                if kind == "tensor":
                    res = client.infer(cfg.model, [tensor], client_timeout=60)
                else:
                    res = client.infer(image_model_name(cfg.model), [raw], client_timeout=60)
                version = res.get_response().model_version
                sent = Sent(start, time.monotonic() - start, kind, True, version)
            except Exception as e:  # noqa: BLE001 - every failure is recorded
                sent = Sent(start, time.monotonic() - start, kind, False, error=str(e)[:300])
            with run.lock:
                run.sent.append(sent)
    finally:
        client.close()


def _all_up(url: str, count: int) -> bool:
    from serve.client import admin

    reps = admin.replicas(url)
    return len(reps) == count and all(r.up for r in reps)


def _chaos(run: Run, cfg: ChaosConfig, srv: Any, t0: float, repo: Path) -> None:
    """The faults and the rollout, on their schedule."""
    from serve.client import admin

    rng = random.Random(cfg.seed)
    count = cfg.replicas
    next_kill = t0 + cfg.kill_every
    rollout_at = t0 + cfg.seconds / 3 if cfg.rollout else None
    rollback_at = t0 + 2 * cfg.seconds / 3 if cfg.rollout else None
    end = t0 + cfg.seconds
    while time.monotonic() < end - 1:
        now = time.monotonic()
        if now >= next_kill:
            pids = srv.triton_pids()
            if pids:
                victim = rng.choice(pids)
                os.kill(victim, signal.SIGKILL)
                ev = Event(now - t0, "kill", f"tritonserver pid {victim}")
                run.events.append(ev)
                log.info("chaos: killed tritonserver %d at %.1f s", victim, ev.at)
                seen_down = time.monotonic() + 5  # the health checks see it go first
                while _all_up(srv.grpc_url, count) and time.monotonic() < seen_down:
                    time.sleep(0.05)
                deadline = time.monotonic() + 120
                while not _all_up(srv.grpc_url, count) and time.monotonic() < deadline:
                    time.sleep(0.1)
                ev.until = time.monotonic() - t0
                log.info("chaos: full capacity again after %.1f s", ev.until - ev.at)
            next_kill = time.monotonic() + cfg.kill_every
        elif rollout_at is not None and now >= rollout_at:
            rollout_at = None
            version = publish_copy(repo, cfg.model)
            started = time.monotonic() - t0
            admin.load(srv.grpc_url, cfg.model)
            run.events.append(
                Event(started, "rollout", f"version {version}", time.monotonic() - t0)
            )
            log.info(
                "chaos: version %d rolled out in %.1f s", version, time.monotonic() - t0 - started
            )
        elif rollback_at is not None and now >= rollback_at:
            rollback_at = None
            started = time.monotonic() - t0
            frm, to = admin.rollback(srv.grpc_url, cfg.model)
            run.events.append(Event(started, "rollback", f"{frm} -> {to}", time.monotonic() - t0))
            log.info(
                "chaos: rolled back %d -> %d in %.1f s", frm, to, time.monotonic() - t0 - started
            )
        else:
            time.sleep(0.1)


def _percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(max(ms)),
    }


def report(run: Run, cfg: ChaosConfig, t0: float, machine: dict[str, Any]) -> dict[str, Any]:
    """Counts, failures by reason, latencies outside and during faults, recovery times."""
    windows = [(e.at, e.until) for e in run.events if e.what == "kill" and e.until is not None]
    ops = [(e.at, e.until) for e in run.events if e.what != "kill" and e.until is not None]

    def inside(s: Sent, spans: list) -> bool:  # in flight at some point of a span
        start, end = s.start - t0, s.start - t0 + s.seconds
        return any(start <= b and end >= a for a, b in spans)

    sent = sorted(run.sent, key=lambda s: s.start)
    failed = [s for s in sent if not s.ok]
    reasons: dict[str, int] = {}
    for s in failed:
        why = s.error.split("] ", 1)[-1][:80] or "?"
        reasons[why] = reasons.get(why, 0) + 1
    ok = [s for s in sent if s.ok]
    calm = [s.seconds * 1e3 for s in ok if not inside(s, windows + ops)]
    faults = [s.seconds * 1e3 for s in ok if inside(s, windows)]
    rollouts = [s.seconds * 1e3 for s in ok if inside(s, ops)]
    failed_outside = [s for s in failed if not inside(s, windows)]
    recoveries = [b - a for a, b in windows]
    if cfg.replicas >= 2:
        passed = not failed
        target = "no failed request through the kills and the rollout"
    else:
        passed = not failed_outside and all(r <= RESTART_TARGET_S for r in recoveries)
        target = f"failures only inside restart windows, each ready within {RESTART_TARGET_S:g} s"
    versions: dict[str, int] = {}
    for s in ok:
        versions[s.version] = versions.get(s.version, 0) + 1
    return {
        "settings": asdict(cfg),
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sent": len(sent),
        "answered": len(ok),
        "failed": len(failed),
        "failed_outside_restart_windows": len(failed_outside),
        "failures_by_reason": reasons,
        "answered_by_version": versions,
        "latency_outside_faults": _percentiles(calm),
        "latency_during_faults": _percentiles(faults),
        "latency_during_rollouts": _percentiles(rollouts),
        "kills": len(windows),
        "seconds_to_full_capacity": recoveries,
        "events": [asdict(e) for e in run.events],
        "target": target,
        "passed": passed,
        "timeline": [
            [round(s.start - t0, 3), round(s.seconds * 1e3, 2), s.ok, s.kind] for s in sent
        ],
    }


def plot(rep: dict[str, Any], path: Path) -> None:
    """Each request's latency over the run (failures marked), kills and their recovery
    windows shaded, the rollout and rollback spans."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(10, 4.5))
    rows = rep["timeline"]
    for kind, marker in (("tensor", "."), ("raw", "x")):
        pts = [(t, ms) for t, ms, ok, k in rows if ok and k == kind]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker, ms=3, ls="", label=f"{kind} answered")
    bad = [(t, ms) for t, ms, ok, _ in rows if not ok]
    if bad:
        ax.plot(*zip(*bad, strict=True), "v", color="red", ms=6, ls="", label="failed")
    for e in rep["events"]:
        color = {"kill": "tab:red", "rollout": "tab:green", "rollback": "tab:purple"}[e["what"]]
        ax.axvspan(e["at"], e["until"] or e["at"] + 0.2, color=color, alpha=0.15)
        ax.axvline(e["at"], color=color, lw=1)
        ax.annotate(
            e["what"],
            (e["at"], 1),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
        )
    s = rep["settings"]
    verdict = "PASSED" if rep["passed"] else "FAILED"
    ax.set(
        yscale="log",
        xlabel="seconds",
        ylabel="latency (ms, log)",
        title=f"{s['model']}: {s['replicas']} replica(s), c={s['concurrency']}, kill every "
        f"{s['kill_every']:g} s: {rep['answered']}/{rep['sent']} answered, {rep['failed']} "
        f"failed - {verdict} ({rep['machine'].get('cpu', '?')})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """The run (see the module docstring); returns the report."""
    from serve.core.machine import machine_info
    from serve.runtime.stack import PublicServer
    from serve.tools.bench_inputs import bench_inputs
    from serve.tools.bench_server import bench_server_options

    out = Path(cfg.out)
    work = out / ".chaos"
    work.mkdir(parents=True, exist_ok=True)
    repo = scratch_repository(Path(cfg.model_repository), work)
    inputs = bench_inputs(repo, cfg.model, cfg.data, 2)
    pixels, image = inputs.pixels[:1], bytes(inputs.raw[0, 0])
    opts = bench_server_options(repo)
    run = Run()
    with PublicServer(opts, log_path=work / "server.log", replicas=cfg.replicas) as srv:
        workers = [
            threading.Thread(target=_load, args=(run, cfg, srv.grpc_url, pixels, image, k))
            for k in range(cfg.concurrency)
        ]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        try:
            _chaos(run, cfg, srv, t0, repo)
            time.sleep(max(0.0, t0 + cfg.seconds - time.monotonic()))
        finally:
            run.stop.set()
            for w in workers:
                w.join(120)
    return report(run, cfg, t0, machine_info())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, ChaosConfig, CHAOS_FLAGS)


def run_command(a: argparse.Namespace) -> int:
    """``python -m serve chaos``: exit 0 when the target holds, 1 when it does not."""
    cfg = build(ChaosConfig, a, CHAOS_FLAGS)
    rep = chaos(cfg)
    out = Path(cfg.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"chaos-{cfg.model}-r{cfg.replicas}"
    atomic_write_json(out / f"{name}-{stamp}.json", rep)
    atomic_write_json(out / f"{name}-latest.json", rep)
    plot(rep, out / f"{name}-latest.png")
    print(
        f"chaos ({cfg.replicas} replica(s), {rep['kills']} kills"
        f"{', a rollout and a rollback' if cfg.rollout else ''}): {rep['sent']} sent, "
        f"{rep['answered']} answered, {rep['failed']} failed {rep['failures_by_reason'] or ''}"
    )
    calm, hit = rep["latency_outside_faults"], rep["latency_during_faults"]
    print(
        f"p50/p99 outside faults {calm['p50_ms'] or 0:.1f}/{calm['p99_ms'] or 0:.1f} ms, during "
        f"faults {hit['p50_ms'] or 0:.1f}/{hit['p99_ms'] or 0:.1f} ms; back to full capacity "
        f"after {', '.join(f'{s:.1f}' for s in rep['seconds_to_full_capacity']) or '-'} s"
    )
    print(f"target: {rep['target']}: {'PASSED' if rep['passed'] else 'FAILED'}")
    print(f"wrote {out / (name + '-latest.json')}, {out / (name + '-latest.png')}")
    return 0 if rep["passed"] else 1
