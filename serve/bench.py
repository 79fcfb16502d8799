"""``python -m serve bench`` (``make bench``): throughput and latency of a served model,
side by side with in-process baselines, on this machine.

perf_analyzer's essentials on tritonclient: a closed-loop concurrency sweep (N clients,
each sending its next request when the previous answer arrives) over HTTP and gRPC,
tensor and raw-image input; per level throughput, p50/p90/p95/p99 latency, errors, and
Triton's own queue/compute time and average executed batch (statistics API deltas). A
level stops when 3 consecutive windows agree within 10% (Model Navigator's rule) or at
a time cap. Baselines in the same run: ONNX Runtime and PyTorch eager in-process, so
every Triton figure is also a ratio to them. Writes ``bench/<model>-<date>.json``,
``bench/<model>-latest.json`` and a PNG (throughput vs p99 latency per protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve.client import Classifier
from serve.evaluate import list_image_folder
from serve.preprocess import ResizeCrop, preprocess


@dataclass
class Level:
    """One measured point."""

    backend: str  # triton-grpc | triton-grpc-shm | triton-http | onnxruntime | pytorch | tensorrt
    input: str  # tensor | raw
    batch: int
    concurrency: int
    throughput: float = 0.0  # images/s
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    requests: int = 0
    stable: bool = False
    seconds: float = 0.0
    server: dict[str, float] = field(default_factory=dict)
    ratio_to_onnxruntime: float | None = None
    ratio_to_pytorch: float | None = None


def _percentiles(lat_s: list[float]) -> dict[str, float]:
    if not lat_s:
        return {k: 0.0 for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")}
    a = np.asarray(lat_s) * 1000
    return {f"p{q}_ms": float(np.percentile(a, q)) for q in (50, 90, 95, 99)}


def measure(
    run_once: Any,
    concurrency: int,
    batch: int,
    window: float,
    max_seconds: float,
    make_worker_state: Any = None,
) -> tuple[list[float], int, int, bool, float]:
    """Closed loop with ``concurrency`` threads calling ``run_once(state)``. Returns the
    latencies of the measured windows, errors, requests, whether it was stable, seconds."""
    lock = threading.Lock()
    records: list[tuple[float, float, bool]] = []  # (end time, latency, ok)
    stop = threading.Event()

    def worker() -> None:
        state = make_worker_state() if make_worker_state else None
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    run_once(state)
                    ok = True
                except Exception:  # noqa: BLE001 - counted as an error of this level
                    ok = False
                t1 = time.perf_counter()
                with lock:
                    records.append((t1, t1 - t0, ok))
        finally:
            close = getattr(state, "close", None)
            if close:
                close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(min(1.0, window))  # warm-up, not measured
    warm_end = time.perf_counter()
    windows: list[tuple[float, float]] = []
    stable = False
    while True:
        w0 = time.perf_counter()
        time.sleep(window)
        w1 = time.perf_counter()
        windows.append((w0, w1))
        with lock:
            counts = [sum(1 for e, _, ok in records if a <= e < b and ok) for a, b in windows]
        rates = [c / (b - a) for c, (a, b) in zip(counts, windows, strict=True)]
        if len(rates) >= 3:
            last = rates[-3:]
            mean = sum(last) / 3
            if mean > 0 and all(abs(r - mean) <= 0.1 * mean for r in last):
                stable = True
                break
        if w1 - warm_end >= max_seconds:
            break
    stop.set()
    for t in threads:
        t.join(30)
    a, b = windows[-3][0] if len(windows) >= 3 else windows[0][0], windows[-1][1]
    with lock:
        chosen = [(lat, ok) for e, lat, ok in records if a <= e < b]
    lat = [x for x, ok in chosen if ok]
    errors = sum(1 for _, ok in chosen if not ok)
    return lat, errors, len(chosen), stable, b - a + (warm_end - start) * 0


def _server_stats(client: Any, model: str) -> dict[str, float]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    tot: dict[str, float] = {
        "queue_ns": 0,
        "compute_ns": 0,
        "success": 0,
        "exec": 0,
        "inferences": 0,
    }
    for s in stats:
        inf = s.get("inference_stats", {})
        tot["queue_ns"] += float(inf.get("queue", {}).get("ns", 0))
        tot["compute_ns"] += float(inf.get("compute_infer", {}).get("ns", 0))
        tot["success"] += float(inf.get("success", {}).get("count", 0))
        tot["exec"] += float(s.get("execution_count", 0))
        tot["inferences"] += float(s.get("inference_count", 0))
    return tot


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in before}
    n = max(d["success"], 1)
    return {
        "avg_queue_ms": d["queue_ns"] / n / 1e6,
        "avg_compute_ms": d["compute_ns"] / n / 1e6,
        "avg_executed_batch": d["inferences"] / d["exec"] if d["exec"] else 0.0,
    }


def peak_gflops(seconds: float = 3.0, n: int = 2048) -> dict[str, float]:
    """Measured FP32 GEMM peak of this machine (all threads), with the library that serves
    (ONNX Runtime's MLAS) and with torch's BLAS; the higher one is the machine's peak."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])],
        "gemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "AB"],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = {}
    for name, fn in (
        ("onnxruntime", lambda: session.run(None, {"A": a, "B": b})),
        ("torch", lambda: ta @ tb),
    ):
        fn()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            reps += 1
        out[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    out["peak"] = max(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def model_gflops(card: dict[str, Any], onnx_path: Path) -> float:
    """FLOPs per image of the checkpoint's network (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train.models import build_model

    model = build_model(card["arch"], len(card["classes"]), **card.get("arch_options", {}))
    c, h, w = card["preprocess"]["input_size"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, c, h, w))
    return counter.get_total_flops() / 1e9


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class BenchInputs:
    """The latest published version of a model and real images to send to it."""

    version_dir: Path
    card: dict[str, Any]
    pixels: np.ndarray  # [N, 3, H, W] float32, the model's eval preprocessing
    raw: np.ndarray  # [N, 1] encoded bytes of the same images


def bench_inputs(repo: Path, model: str, data: str = "", count: int = 16) -> BenchInputs:
    """Images from ``data`` (default: the model card's val split), ``count`` of them (tiled
    when the folder is smaller), as pixels and as encoded bytes."""
    version_dir = _latest_version(repo, model)
    card = json.loads((version_dir / "model_card.json").read_text())
    pre = card["preprocess"]
    geometry = ResizeCrop(
        int(pre["resize"]), int(pre["crop"]), pre.get("interpolation", "bilinear")
    )
    _, samples = list_image_folder(data or Path(card["training_config"]["data"]) / "val")
    paths = [p for p, _ in samples][:count]
    pixels = np.stack([preprocess(p, geometry) for p in paths])
    raw = np.array([[Path(p).read_bytes()] for p in paths], dtype=object)
    while len(pixels) < count:
        pixels, raw = np.concatenate([pixels, pixels]), np.concatenate([raw, raw])
    return BenchInputs(version_dir, card, pixels[:count], raw[:count])


def machine_info(peak: dict[str, float]) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "peak_gflops_fp32": peak["peak"],
        "gemm_gflops": peak,
        "python": platform.python_version(),
    }


def _latest_version(repo: Path, model: str) -> Path:
    versions = sorted((int(p.name), p) for p in (repo / model).iterdir() if p.name.isdigit())
    if not versions:
        raise FileNotFoundError(f"no published version of {model} in {repo} (run make export)")
    return versions[-1][1]


def _baseline_ort(
    onnx_path: Path, pixels: np.ndarray, window: float, cap: float, batch: int
) -> Level:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = pixels[:batch]
    lat, err, n, stable, secs = measure(
        lambda _: session.run(None, {name: x}), 1, batch, window, cap
    )
    return _level("onnxruntime", "tensor", batch, 1, lat, err, n, stable, secs)


def _baseline_pytorch(
    card: dict[str, Any], pixels: np.ndarray, window: float, cap: float, batch: int
) -> Level | str:
    ckpt_path = Path(card.get("checkpoint", ""))
    if not ckpt_path.is_file():
        return f"checkpoint {ckpt_path} not found"
    import torch

    from export.onnx_export import pixel_model
    from train.checkpoint import load_checkpoint

    model = pixel_model(load_checkpoint(ckpt_path))
    x = torch.from_numpy(pixels[:batch])

    def once(_: Any) -> None:
        with torch.inference_mode():
            model(x)

    lat, err, n, stable, secs = measure(once, 1, batch, window, cap)
    return _level("pytorch", "tensor", batch, 1, lat, err, n, stable, secs)


class _External:
    """A server started elsewhere (same interface as TritonServer for the sweep)."""

    def __init__(self, grpc_url: str, http_url: str) -> None:
        self.grpc_url, self.http_url = grpc_url, http_url or grpc_url

    def __enter__(self) -> _External:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _baseline_tensorrt(
    version_dir: Path, pixels: np.ndarray, args: argparse.Namespace
) -> Level | str:
    """The bare engine (Polygraphy TrtRunner), where the repository holds one and
    TensorRT + a GPU are here."""
    plan = Path(args.engine) if args.engine else version_dir / "model.plan"
    if not plan.is_file():
        return f"no TensorRT engine ({plan} missing; a CPU repository has none)"
    try:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from export.tensorrt_engine import check_compatible

        meta = check_compatible(plan)
    except Exception as e:  # TensorRT missing, other GPU: the reason is the result
        return f"cannot run {plan}: {e}"
    x = pixels[: args.batch]
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan)))) as runner:
        lat, err, n, stable, secs = measure(
            lambda _: runner.infer({meta["input"]["name"]: x}),
            1,
            args.batch,
            args.window,
            args.max_seconds,
        )
    return _level("tensorrt", "tensor", args.batch, 1, lat, err, n, stable, secs)


def _level(
    backend: str,
    inp: str,
    batch: int,
    conc: int,
    lat: list[float],
    err: int,
    n: int,
    stable: bool,
    secs: float,
) -> Level:
    return Level(
        backend,
        inp,
        batch,
        conc,
        throughput=len(lat) * batch / max(secs, 1e-9),
        errors=err,
        requests=n,
        stable=stable,
        seconds=round(secs, 2),
        **_percentiles(lat),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    from serve.triton_server import ServerOptions, TritonServer, free_port

    repo = Path(args.model_repository)
    inputs = bench_inputs(repo, args.model, args.data, max(args.batch, 16))
    version_dir, card, pixels, raw = inputs.version_dir, inputs.card, inputs.pixels, inputs.raw
    say = lambda m: print(m, file=__import__("sys").stderr, flush=True)  # noqa: E731
    peak = peak_gflops()
    gflop = model_gflops(card, version_dir / "model.onnx")
    report: dict[str, Any] = {
        "model": args.model,
        "version": int(version_dir.name),
        "arch": card["arch"],
        "gflop_per_image": round(gflop, 3),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(peak),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "results": [],
        "skipped": {},
    }
    say(f"machine: {report['machine']}; {args.model} ({card['arch']}): {gflop:.2f} GFLOP/image")
    ort_level = _baseline_ort(
        version_dir / "model.onnx", pixels, args.window, args.max_seconds, args.batch
    )
    ort_level.server = {"efficiency_of_peak": ort_level.throughput * gflop / peak["peak"]}
    report["results"].append(asdict(ort_level))
    say(
        f"onnxruntime in-process: {ort_level.throughput:.1f} img/s "
        f"({100 * ort_level.throughput * gflop / peak['peak']:.0f}% of the "
        f"{peak['peak']:.0f} GFLOP/s GEMM peak)"
    )
    pt = _baseline_pytorch(card, pixels, args.window, args.max_seconds, args.batch)
    if isinstance(pt, str):
        report["skipped"]["pytorch"] = pt
    else:
        report["results"].append(asdict(pt))
        say(f"pytorch eager in-process: {pt.throughput:.1f} img/s")
    pt_tp = None if isinstance(pt, str) else pt.throughput

    engine = _baseline_tensorrt(version_dir, pixels, args)
    if isinstance(engine, str):
        report["skipped"]["tensorrt"] = engine
    else:
        report["results"].append(asdict(engine))
        say(f"tensorrt engine in-process: {engine.throughput:.1f} img/s")

    if args.grpc_url:  # an external server, e.g. the NGC container on a GPU host
        srv_ctx: Any = _External(args.grpc_url, args.http_url)
    else:
        opts = ServerOptions(
            model_repository=str(repo),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
        )
        srv_ctx = TritonServer(opts, log_path=Path(args.out) / "bench-server.log")
    with srv_ctx as srv:
        stats_client = grpcclient.InferenceServerClient(srv.grpc_url)
        for model, batch in ((args.model, pixels), (f"{args.model}_image", raw)):
            with Classifier(srv.grpc_url, model) as clf:  # warm-up: first runs are slow
                for _ in range(5):
                    clf.logits(batch[: args.batch])
        for protocol in args.protocols:
            url = srv.http_url if protocol == "http" else srv.grpc_url
            wire, shm = ("grpc", True) if protocol == "grpc-shm" else (protocol, False)
            for kind in args.inputs:
                if shm and kind == "raw":
                    continue  # shared memory carries the pixel tensors; bytes go in the body
                model = args.model if kind == "tensor" else f"{args.model}_image"
                batch = (pixels if kind == "tensor" else raw)[: args.batch]
                for conc in args.concurrency:
                    before = _server_stats(stats_client, args.model)
                    lat, err, n, stable, secs = measure(
                        lambda clf, b=batch: clf.logits(b),
                        conc,
                        args.batch,
                        args.window,
                        args.max_seconds,
                        make_worker_state=lambda u=url, m=model, p=wire, x=shm: Classifier(
                            u, m, protocol=p, shared_memory=x
                        ),
                    )
                    level = _level(
                        f"triton-{protocol}", kind, args.batch, conc, lat, err, n, stable, secs
                    )
                    level.server = _delta(before, _server_stats(stats_client, args.model))
                    level.ratio_to_onnxruntime = level.throughput / ort_level.throughput
                    level.ratio_to_pytorch = level.throughput / pt_tp if pt_tp else None
                    report["results"].append(asdict(level))
                    say(
                        f"{level.backend:12s} {kind:6s} c={conc:<3d} {level.throughput:7.1f} img/s"
                        f"  p50 {level.p50_ms:7.1f}  p99 {level.p99_ms:7.1f} ms  "
                        f"x{level.ratio_to_onnxruntime:.2f} ORT  errors {err}"
                        f"{'' if stable else '  (not stable: time cap)'}"
                    )
        stats_client.close()
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in report["results"]:
        groups.setdefault((r["backend"], r["input"]), []).append(r)
    for (backend, kind), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        xs, ys = [r["p99_ms"] for r in rows], [r["throughput"] for r in rows]
        style = "o-" if backend.startswith("triton") else "*"
        ax.plot(xs, ys, style, ms=8 if style == "*" else 4, label=f"{backend} ({kind})")
        if backend.startswith("triton"):
            for r in rows:
                ax.annotate(
                    str(r["concurrency"]),
                    (r["p99_ms"], r["throughput"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    ax.set(
        xscale="log",
        xlabel="p99 latency (ms, log)",
        ylabel="throughput (images/s)",
        title=f"{report['model']} ({report['arch']}) on {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores; labels = concurrency",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(report: dict[str, Any], concurrency: tuple[int, ...] = (1, 4, 16)) -> str:
    """The README's table from a bench JSON: the in-process baselines, then every Triton
    row at the given concurrency levels."""
    head = (
        "| backend | input | concurrency | img/s | p50 ms | p99 ms | errors | x ORT "
        "| queue ms | compute ms | avg batch |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    ort = next(r for r in report["results"] if r["backend"] == "onnxruntime")
    lines = [head]
    for r in report["results"]:
        triton = r["backend"].startswith("triton")
        if triton and r["concurrency"] not in concurrency:
            continue
        name = r["backend"] if triton else f"{r['backend']} in-process"
        name = name.replace("pytorch", "pytorch eager")
        ratio = r.get("ratio_to_onnxruntime") or r["throughput"] / ort["throughput"]
        srv = r.get("server") or {}
        extra = (
            f"{srv.get('avg_queue_ms', 0):.1f} | {srv.get('avg_compute_ms', 0):.1f} | "
            f"{srv.get('avg_executed_batch', 0):.2f}"
            if triton
            else " |  | "
        )
        lines.append(
            f"| {name} | {r['input']} | {r['concurrency']} | {r['throughput']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {ratio:.2f} | {extra} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serve bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="antsbees")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument(
        "--data",
        default="",
        help="ImageFolder split with images to send (default: the model card's val split)",
    )
    p.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32]
    )
    p.add_argument(
        "--protocols",
        type=lambda s: s.split(","),
        default=["grpc", "grpc-shm", "http"],
        help="grpc-shm: gRPC with the pixels in system shared memory (same machine only)",
    )
    p.add_argument("--inputs", type=lambda s: s.split(","), default=["tensor", "raw"])
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--window", type=float, default=2.0, help="seconds per stability window")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time cap per level")
    p.add_argument(
        "--grpc-url",
        default="",
        help="bench a running server (e.g. the NGC "
        "container on a GPU host) instead of starting the bundled one",
    )
    p.add_argument("--http-url", default="", help="with --grpc-url: its HTTP address")
    p.add_argument(
        "--engine",
        default="",
        help="TensorRT engine for the bare-engine baseline "
        "(default: the version's model.plan, if any)",
    )
    p.add_argument("--out", default="bench")
    p.add_argument(
        "--table",
        default="",
        metavar="JSON",
        help="print the README table of a bench JSON (rows at --concurrency), exit",
    )
    args = p.parse_args(argv)
    if args.table:
        report = json.loads(Path(args.table).read_text())
        print(markdown_table(report, tuple(args.concurrency)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"{args.model}-{stamp}.json", f"{args.model}-latest.json"):
        (out / name).write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"{args.model}-latest.png")
    print(f"wrote {out}/{args.model}-{stamp}.json, {args.model}-latest.json/.png")
    return 0
