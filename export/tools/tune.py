"""``python -m export tune`` (``make tune``): search the classifier's serving config with
perf_analyzer and publish the best one under a p99 budget.

Triton Model Analyzer does this search upstream; here it cannot run (see docs/benchmarks.md
"make tune": the command and its error), so this module does the same search with perf_analyzer
directly: every candidate config (instance count x max batch size x dynamic-batching
``max_queue_delay_microseconds``, plus the published config as it is) is written into a
scratch copy of the model's folder (the version folders linked, not copied), reloaded on
one bundled tritonserver through the model-control API, and measured at each concurrency
level over gRPC with real val images. A candidate's score is its best throughput at a
level whose p99 is within the budget; the winner's knobs are written into the model's
``config.pbtxt`` (and the image pipeline's ``max_batch_size``) under the model's publish
lock - a config change only, no new version: the signature (inputs, outputs, labels) and
the preprocessing stay as they are.

Writes ``<out>/<model>-tune.json`` and ``<out>/<model>-tune.png``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from export.tools.tune_config import TUNE_FLAGS, TuneConfig
from export.tools.tune_trials import Knobs, Point, Trial
from export.triton.config import signature
from serve.backend.errors import UsageError
from serve.core import auth
from serve.core.files import atomic_write_json, atomic_write_text, latest_version, locked
from serve.core.flags import add_flags, build
from serve.core.model_config import config_text, parse_config
from serve.core.names import image_model_name, preprocess_model_name
from serve.tools import perf_analyzer as pa
from serve.tools import perf_analyzer_install as pa_install
from serve.tools import perf_analyzer_profile as pa_profile
from serve.tools.bench_inputs import bench_inputs, write_input_data
from serve.tools.bench_server import bench_server_options, bench_stack

log = logging.getLogger(__name__)


def read_knobs(config_path: Path) -> Knobs:
    """The knobs of a published classifier config."""
    cfg = parse_config(config_path.read_text())
    return Knobs(
        instances=sum(g.count or 1 for g in cfg.instance_group) or 1,
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_us=cfg.dynamic_batching.max_queue_delay_microseconds,
    )


def with_knobs(text: str, knobs: Knobs) -> str:
    """``text`` (a classifier config.pbtxt) with ``knobs`` applied; preferred batch sizes
    above the new max batch size are dropped. The signature must not change."""
    cfg = parse_config(text)
    before = signature(cfg)
    cfg.max_batch_size = knobs.max_batch_size
    if not cfg.instance_group:
        cfg.instance_group.add()
    for i, group in enumerate(cfg.instance_group):
        group.count = knobs.instances if i == 0 else 0
    del cfg.instance_group[1:]
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = knobs.max_queue_delay_us
    kept = [b for b in db.preferred_batch_size if b <= knobs.max_batch_size]
    del db.preferred_batch_size[:]
    db.preferred_batch_size.extend(kept)
    for warm in list(cfg.model_warmup):
        if warm.batch_size > knobs.max_batch_size:
            cfg.model_warmup.remove(warm)
    if signature(cfg) != before:
        raise ValueError("a config change must not change the model's signature")
    return config_text(cfg)


def candidates(
    current: Knobs, instances: Sequence[int], batches: Sequence[int], delays: Sequence[int]
) -> list[Knobs]:
    """The published config first, then the grid (without a duplicate of it), then the
    published config again: the machine may drift during a search, so the current config
    is judged by the better of its two measurements."""
    grid = [Knobs(i, b, d) for i, b, d in itertools.product(instances, batches, delays)]
    return [current] + [k for k in grid if k != current] + [current]


def scratch_repo(repo: Path, model: str, work: Path) -> Path:
    """A model repository holding only ``model``: its config and labels copied, every
    other entry (versions, warmup inputs) linked."""
    src = repo / model
    dst = work / "repo" / model
    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.name in ("config.pbtxt", "labels.txt"):
            shutil.copy2(entry, dst / entry.name)
        else:
            (dst / entry.name).symlink_to(entry.resolve())
    return dst.parent


def _reload(client: Any, model: str, headers: dict[str, str] | None) -> None:
    client.load_model(model, headers=headers, client_timeout=300)
    deadline = time.monotonic() + 300
    while not client.is_model_ready(model):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model} not ready 300 s after the reload")
        time.sleep(0.2)


def search(cfg: TuneConfig, work: Path) -> tuple[list[Trial], dict[str, Any]]:
    """Measure every candidate on one bundled server; returns the trials and facts."""
    import tritonclient.grpc as grpcclient

    repo = Path(cfg.model_repository)
    current = read_knobs(repo / cfg.model / "config.pbtxt")
    trials = [
        Trial(k, is_current=(k == current))
        for k in candidates(current, cfg.instances, cfg.max_batch_sizes, cfg.delays_us)
    ]
    inputs = bench_inputs(repo, cfg.model, cfg.data, 16)
    data = write_input_data(inputs, cfg.model, work)["tensor"]
    scratch = scratch_repo(repo, cfg.model, work)
    config_path = scratch / cfg.model / "config.pbtxt"
    original = config_path.read_text()
    opts = bench_server_options(scratch, [cfg.model])
    facts = {"version": int(inputs.version_dir.name), "precision": inputs.card.precision}
    with bench_stack(opts, work / "tune-server.log") as srv:
        headers = auth.headers(opts.admin_key) or {}  # the reloads, from here (no argv)
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            for trial in tqdm(trials, desc="configs", unit="config"):
                atomic_write_text(config_path, with_knobs(original, trial.knobs))
                try:
                    _reload(client, cfg.model, headers)
                    # through the front's owner listener, in Triton's namespace (no key)
                    trial.points = measure(srv.perf_url("grpc"), cfg, data)
                except (pa_install.PerfAnalyzerError, TimeoutError, Exception) as e:  # noqa: BLE001
                    trial.error = str(e).splitlines()[0][:300]  # recorded; the search goes on
                log.info("%-16s %s", trial.knobs.label, trial.error or _describe(trial, cfg.p99_ms))
        finally:
            client.close()
    return trials, facts


def measure(where: tuple[str, int], cfg: TuneConfig, data: Path) -> list[Point]:
    """perf_analyzer at each of ``cfg.concurrency`` against the reloaded config, at
    ``where`` (the URL, and the PID whose namespaces it runs in)."""
    url, netns_pid = where
    points = []
    for conc in cfg.concurrency:
        profile = pa_profile.Profile(
            model=cfg.model,
            url=url,
            netns_pid=netns_pid,
            protocol="grpc",
            concurrency=conc,
            input_data=str(data),
            measurement_interval_ms=int(cfg.window * 1000),
            stability_percentage=cfg.stability,
            max_trials=cfg.max_trials,
        )
        try:
            result = pa.run(profile, Path(data).parent / "tune.csv")
        except pa.Unstable as e:
            log.warning("c=%d: %s", conc, e)
            continue
        row = result.rows[-1]
        points.append(
            Point(
                conc,
                row.throughput,
                row.p50_ms,
                row.p99_ms,
                row.server_queue_ms,
                row.server_compute_ms,
                result.stable,
            )
        )
    return points


def _describe(trial: Trial, budget: float) -> str:
    best = trial.best(budget)
    pts = "  ".join(
        f"c{p.concurrency}: {p.throughput:.1f}/s p99 {p.p99_ms:.0f}" for p in trial.points
    )
    return f"best {best.throughput:.1f} img/s at c={best.concurrency}  ({pts})" if best else pts


def publish_knobs(repo: Path, model: str, knobs: Knobs) -> list[Path]:
    """Write ``knobs`` into the published classifier config under the model's publish
    lock (a config change, no new version); the preprocess model and the ensemble follow
    the max batch size (an ensemble may not batch more than its steps). Returns the
    configs written."""
    written = []
    with locked(repo / model, what="publisher of this model"):
        path = repo / model / "config.pbtxt"
        atomic_write_text(path, with_knobs(path.read_text(), knobs))
        written.append(path)
        for other in (preprocess_model_name(model), image_model_name(model)):
            p = repo / other / "config.pbtxt"
            if p.is_file():
                cfg = parse_config(p.read_text())
                cfg.max_batch_size = knobs.max_batch_size
                for warm in list(cfg.model_warmup):
                    if warm.batch_size > knobs.max_batch_size:
                        cfg.model_warmup.remove(warm)
                atomic_write_text(p, config_text(cfg))
                written.append(p)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, TuneConfig, TUNE_FLAGS)


def run(args: argparse.Namespace) -> int:
    """``python -m export tune`` (``make tune``): :func:`tune` on the config the flags
    describe."""
    return tune(build(TuneConfig, args, TUNE_FLAGS))


def tune(cfg: TuneConfig) -> int:
    """The search, its report, the winner (published with ``cfg.publish``)."""
    import json

    if cfg.table:
        from export.tools.tune_report import markdown_table

        try:
            print(markdown_table(json.loads(Path(cfg.table).read_text())))
        except (ValueError, KeyError) as e:  # not a tune report
            raise UsageError(f"--table {cfg.table}: not a tune JSON ({e!r})") from None
        return 0
    if not cfg.data:
        raise UsageError("--data is required (an ImageFolder split with images, e.g. .../val)")
    # SIGTERM unwinds like Ctrl-C, so the tune server is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".tune"
    from export.tools.tune_report import markdown_table, plot, report

    trials, facts = search(cfg, work)
    rep = report(cfg, trials, facts)
    winner = Knobs(**rep["winner"])
    if cfg.publish and not next(t for t in trials if t.knobs == winner).is_current:
        repo = Path(cfg.model_repository)
        rep["published"] = [str(p) for p in publish_knobs(repo, cfg.model, winner)]
        rep["published_version"] = int(latest_version(repo / cfg.model).name)
    json_path = atomic_write_json(out / f"{cfg.model}-tune.json", rep)
    plot(rep, out / f"{cfg.model}-tune.png")
    print(markdown_table(rep))
    gain, best = rep["winner_vs_current"], rep["best_vs_current"]
    print(
        f"winner {winner.label} vs current {Knobs(**rep['current']).label}: "
        + (
            f"x{gain:.2f} (best measured {Knobs(**rep['best_measured']).label} x{best:.2f}, "
            f"published only above x{cfg.min_gain:g})"
            if gain
            else "current config has no level within the budget"
        )
        + (" (published)" if rep["published"] else "")
    )
    print(f"wrote {json_path}, {out / f'{cfg.model}-tune.png'}")
    return 0
