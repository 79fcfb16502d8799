"""The serving benchmark: perf_analyzer installed by setup, its CSV parsed from real runs
against the test server, the harness's documented JSON and plot, and the config search."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from serve.core import auth
from serve.tools import perf_analyzer as pa
from serve.tools import perf_analyzer_install as pa_install
from serve.tools import perf_analyzer_profile as pa_profile
from tests.helpers import HYMENOPTERA, run_cli

RESULT_KEYS = {
    "backend",
    "input",
    "batch",
    "concurrency",
    "throughput",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "errors",
}


def _binary() -> Path:
    try:
        return pa_install.find_binary()
    except pa_install.PerfAnalyzerError as e:
        pytest.skip(f"perf_analyzer is not installed: {e}")


def test_perf_analyzer_found_after_setup() -> None:
    binary = _binary()
    assert pa_install.version(binary) == pa_install.VERSION  # the bundled tritonserver's version
    assert pa_install.missing_libraries(binary.parent.parent / "libexec" / "perf_analyzer") == []


@pytest.fixture(scope="module")
def input_data(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from serve.tools.bench_inputs import bench_inputs, write_input_data

    inputs = bench_inputs(model_repo, "antsbees", HYMENOPTERA / "val", 4)
    return write_input_data(inputs, "antsbees", tmp_path_factory.mktemp("pa"))


@pytest.fixture(scope="module")
def bench_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """The stack make bench starts: serve run's, with the front's owner listeners."""
    from serve.tools.bench_server import bench_server_options, bench_stack

    log = tmp_path_factory.mktemp("pa-srv") / "server.log"
    srv = bench_stack(bench_server_options(model_repo), log).start()
    yield srv
    srv.stop()


def _profile(server, protocol: str = "grpc", direct: bool = False, **kw) -> pa_profile.Profile:
    """perf_analyzer where make bench runs it: in the server's namespaces, at the front's
    owner listener (``direct``: Triton's own port), with no key in its argv."""
    url, pid = server.perf_url(protocol, direct)
    base = {
        "model": "antsbees",
        "url": url,
        "netns_pid": pid,
        "protocol": protocol,
        "measurement_interval_ms": 500,
        "max_trials": 6,
        "stability_percentage": 50,
    }
    return pa_profile.Profile(**{**base, **kw})


def _argv_with(secret: str) -> list[str]:
    """Every process's command line that holds ``secret`` (as another local user sees it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if secret in argv:
                found.append(argv.replace("\0", " ")[:200])
    return found


@pytest.mark.parametrize(
    ("fixture", "protocol", "kind", "shm", "rate", "direct"),
    [
        ("bench_server", "grpc", "tensor", "system", 0.0, False),
        ("server", "http", "raw", "none", 0.0, False),
        ("server", "http", "tensor", "system", 0.0, True),
        ("bench_server", "grpc", "raw", "none", 10.0, False),
    ],
    ids=["grpc-shm-tensor-c2", "http-raw-c2", "direct-http-shm-c2", "grpc-poisson"],
)
def test_perf_analyzer_csv_parsed_into_rows(
    request, input_data: dict[str, Path], tmp_path: Path, fixture, protocol, kind, shm, rate, direct
) -> None:
    server = request.getfixturevalue(fixture)
    if not server.in_namespace:
        pytest.skip(f"no private namespace here: {server.private_why}")
    profile = _profile(
        server,
        protocol,
        direct,
        model="antsbees" if kind == "tensor" else "antsbees_image",
        shared_memory=shm,
        input_data=str(input_data[kind]),
        concurrency=0 if rate else 2,
        request_rate=rate,
    )
    result = pa.run(profile, tmp_path / "out.csv")
    (row,) = result.rows
    assert row.throughput > 0
    assert 0 < row.p50_ms <= row.p90_ms <= row.p95_ms <= row.p99_ms
    # server-side columns come from the statistics API, which needs the owner
    assert row.server_compute_ms > 0
    if rate:
        assert row.request_rate == rate and row.concurrency == 0
    else:
        assert row.concurrency == 2 and row.request_rate is None


def test_perf_analyzer_failure_names_the_command(bench_server, tmp_path: Path) -> None:
    profile = _profile(bench_server, model="no_such_model", concurrency=1)
    with pytest.raises(pa_install.PerfAnalyzerError, match="no_such_model"):
        pa.run(profile, tmp_path / "out.csv")


def test_perf_analyzer_needs_no_key_in_its_argv(
    bench_server, input_data: dict[str, Path], tmp_path: Path
) -> None:
    """perf_analyzer registers shared memory and reads statistics, both the owner's: on
    the public port without a key it is refused; where make bench runs it (Triton's
    namespace, the front's owner listener) it measures - and while it runs, no process's
    command line holds the admin key (another local user reads them in /proc)."""
    import threading

    if not bench_server.in_namespace:
        pytest.skip(f"no private namespace here: {bench_server.private_why}")
    kw = {"concurrency": 1, "shared_memory": "system", "input_data": str(input_data["tensor"])}
    public = pa_profile.Profile(model="antsbees", url=bench_server.grpc_url, **kw)
    with pytest.raises(pa_install.PerfAnalyzerError, match="admin key|not a public"):
        pa.run(public, tmp_path / "out.csv")
    rows: list = []
    run = threading.Thread(
        target=lambda: rows.append(pa.run(_profile(bench_server, **kw), tmp_path / "ok.csv"))
    )
    run.start()
    leaks: list[str] = []
    while run.is_alive():
        leaks += _argv_with(bench_server.admin_key)
        run.join(0.05)
    assert not leaks, leaks
    (row,) = rows[0].rows
    assert row.throughput > 0 and row.server_compute_ms > 0


@pytest.mark.long
def test_bench_short_sweep(model_repo: Path, trained_run: Path, tmp_path: Path) -> None:
    """make bench end to end (short levels), its JSON and plots, the lockout figure - and
    while it runs, no process's command line holds the admin key of its server."""
    import subprocess
    import sys

    _binary()
    before = set(auth.key_dir().glob("*")) if auth.key_dir().is_dir() else set()
    args = [
        "export",
        "bench",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--model",
        "antsbees",
        "--model-repository",
        str(model_repo),
        "--concurrency",
        "2",
        "--request-rate",
        "10",
        "--protocols",
        "grpc,grpc-shm,http",
        "--inputs",
        "tensor,raw",
        "--window",
        "0.5",
        "--stability",
        "50",
        "--max-trials",
        "6",
        "--max-seconds",
        "3",
        "--lockout-seconds",
        "2",
        "--front-cost",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    keys: set[str] = set()
    leaks: list[str] = []
    while proc.poll() is None:
        for f in set(auth.key_dir().glob("*")) - before if auth.key_dir().is_dir() else ():
            with contextlib.suppress(OSError):
                text = f.read_text().strip()
                if re.fullmatch(r"[A-Za-z0-9_-]{16,}", text):  # a key, not a URL or folder
                    keys.add(text)
        for key in keys:
            leaks += _argv_with(key)
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out[-5000:]
    assert keys, "the bench's server wrote no admin key file"
    assert not leaks, leaks
    report = json.loads((tmp_path / "antsbees-latest.json").read_text())
    assert report["load_generator"]["tool"] == "perf_analyzer"
    assert report["load_generator"]["version"] == pa_install.VERSION
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["peak_gflops_fp32"] > 1 and machine["cpu"]
    assert report["gflop_per_image"] > 0.1
    levels = {(r["backend"], r["input"], r["request_rate"]) for r in report["results"]}
    for backend, kind in [
        ("triton-grpc", "tensor"),
        ("triton-grpc", "raw"),
        ("triton-grpc-shm", "tensor"),
        ("triton-http", "tensor"),
        ("triton-http", "raw"),
    ]:
        assert {(backend, kind, None), (backend, kind, 10.0)} <= levels
    assert {("onnxruntime", "tensor", None), ("pytorch", "tensor", None)} <= levels
    # the same tritonserver measured directly too, so the front's cost is a
    # ratio; the raw-image levels against the in-process image pipeline
    assert {("direct-grpc", "tensor", None), ("direct-grpc", "raw", None)} <= levels
    assert ("image-pipeline", "raw", None) in levels and report["image_pipeline_baseline"] > 0
    costs = {(c["kind"], c["concurrency"]): c for c in report["front_cost"]}
    assert set(costs) == {("tensor", 2), ("raw", 2)}, report["front_cost"]
    assert all(c["throughput_ratio"] > 0 for c in costs.values())
    for r in report["results"]:
        assert set(r) >= RESULT_KEYS and r["errors"] == 0 and r["throughput"] > 0
        assert r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        # CPU time per image: in-process ONNX Runtime's own, the serving processes' (/proc)
        assert r["server"].get("cpu_ms_per_image", 0) > 0, r
        if r["backend"].startswith("triton"):  # to the baselines just before and after
            srv = r["server"]
            assert srv["ratio_min"] <= r["ratio_to_onnxruntime"] <= srv["ratio_max"], srv
            assert srv["cpu_ratio_to_onnxruntime"] > 0
        if r["backend"].startswith(("triton", "direct")):
            assert r["ratio_to_onnxruntime"] > 0 and r["server"]["avg_executed_batch"] >= 1
            assert "stall" in r["server"] or r["request_rate"]
            # where the time went inside Triton, per request
            assert 0 < r["server"]["compute_infer_ms"] <= r["server"]["in_triton_ms"]
        if r["backend"].startswith("triton") and r["input"] == "raw":
            assert r["server"]["ratio_to_image_pipeline"] > 0
    assert "tensorrt" in report["skipped"]  # no engine in a CPU repository
    assert (tmp_path / "antsbees-latest.png").read_bytes().startswith(b"\x89PNG")
    assert len(list(tmp_path.glob("antsbees-2*.json"))) == 1
    lockout = report["lockout"]  # the phases, each judged against idle
    phases = {r["phase"] for r in lockout["phases"]}
    assert {"idle", "slow senders x4", "slow senders x64", "hostile images x3"} <= phases
    for r in lockout["phases"]:
        assert r["requests"] > 0 and 0 <= r["success"] <= 1, r
    assert (tmp_path / "antsbees-lockout-latest.png").read_bytes().startswith(b"\x89PNG")


def test_tune_tiny_grid_publishes_the_winner(model_repo: Path, tmp_path: Path) -> None:
    _binary()
    from export.triton.config import signature
    from serve.core.model_config import parse_config

    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    before = parse_config((repo / "antsbees" / "config.pbtxt").read_text())
    run_cli(
        "export",
        "tune",
        "--model-repository",
        str(repo),
        "--data",
        str(HYMENOPTERA / "val"),
        "--instances",
        "1",
        "--max-batch-sizes",
        "4",
        "--delays-us",
        "0",
        "--concurrency",
        "2",
        "--window",
        "0.5",
        "--stability",
        "50",
        "--p99-ms",
        "100000",
        "--publish",
        "--out",
        str(tmp_path / "out"),
    )
    rep = json.loads((tmp_path / "out" / "antsbees-tune.json").read_text())
    assert [t["is_current"] for t in rep["trials"]] == [True, False, True]
    for t in rep["trials"]:
        assert not t["error"] and t["points"] and t["score"] > 0
    assert rep["winner"] in [t["knobs"] for t in rep["trials"]]
    after = parse_config((repo / "antsbees" / "config.pbtxt").read_text())
    assert signature(after) == signature(before)
    assert after.max_batch_size == rep["winner"]["max_batch_size"]
    assert after.instance_group[0].count == rep["winner"]["instances"]
    ens = parse_config((repo / "antsbees_image" / "config.pbtxt").read_text())
    assert ens.max_batch_size == after.max_batch_size
    assert sorted(p.name for p in (repo / "antsbees").iterdir() if p.name.isdigit()) == sorted(
        p.name for p in (model_repo / "antsbees").iterdir() if p.name.isdigit()
    )  # a config change, no new version
    assert (tmp_path / "out" / "antsbees-tune.png").read_bytes().startswith(b"\x89PNG")
