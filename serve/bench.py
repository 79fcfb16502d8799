"""``python -m serve bench``: throughput and latency of a served model through Triton, with
ONNX Runtime in-process as the baseline every Triton figure is a ratio to (torch-free).

A closed-loop concurrency sweep over gRPC, gRPC with system shared memory and HTTP,
tensor and raw-image input; per level throughput, p50/p90/p95/p99 latency, errors and
Triton's own queue/compute time and average executed batch (statistics API deltas).
``python -m export bench`` (``make bench``) runs the same sweep plus the baselines that
need torch (PyTorch eager, a bare TensorRT engine) in one report.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve import auth
from serve.client import Classifier
from serve.contract import ModelCard, image_model_name
from serve.evaluate import list_image_folder
from serve.files import latest_version
from serve.loadgen import Level, level, measure
from serve.machine import gemm_gflops_onnxruntime, machine_info
from serve.preprocess import ResizeCrop, preprocess

log = logging.getLogger(__name__)


@dataclass
class BenchInputs:
    """The latest published version of a model and real images to send to it."""

    version_dir: Path
    card: ModelCard
    pixels: np.ndarray  # [N, 3, H, W] float32, the model's eval preprocessing
    raw: np.ndarray  # [N, 1] encoded bytes of the same images


def read_card(version_dir: Path) -> ModelCard:
    """A published version's model card (validated)."""
    return ModelCard.from_dict(json.loads((version_dir / "model_card.json").read_text()))


def bench_inputs(repo: Path, model: str, data: str | Path, count: int = 16) -> BenchInputs:
    """``count`` images of the ImageFolder split ``data`` (tiled when it holds fewer), as
    the model's input pixels and as encoded bytes."""
    if not data:
        raise ValueError("give --data: an ImageFolder split with images to send (e.g. .../val)")
    version_dir = latest_version(repo / model)
    card = read_card(version_dir)
    pre = card.preprocessing
    geometry = ResizeCrop(pre.resize, pre.crop, pre.interpolation)
    _, samples = list_image_folder(data)
    paths = [p for p, _ in samples][:count]
    pixels = np.stack([preprocess(p, geometry) for p in paths])
    raw = np.array([[Path(p).read_bytes()] for p in paths], dtype=object)
    while len(pixels) < count:
        pixels, raw = np.concatenate([pixels, pixels]), np.concatenate([raw, raw])
    return BenchInputs(version_dir, card, pixels[:count], raw[:count])


def onnxruntime_baseline(
    onnx_path: Path,
    pixels: np.ndarray,
    batch: int,
    window: float,
    cap: float,
    precision: str = "fp32",
) -> Level:
    """ONNX Runtime in-process on this machine, all threads, batch ``batch``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = pixels[:batch]
    m = measure(lambda _: session.run(None, {name: x}), 1, window, cap)
    return level("onnxruntime", "tensor", batch, 1, m, precision)


def _server_stats(client: Any, model: str, headers: dict | None) -> dict[str, float]:
    stats = client.get_inference_statistics(
        model, as_json=True, headers=headers, client_timeout=30
    )["model_stats"]
    tot = dict.fromkeys(("queue_ns", "compute_ns", "success", "exec", "inferences"), 0.0)
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


class ExternalServer:
    """A server started elsewhere (the same interface as TritonServer for the sweep)."""

    def __init__(self, grpc_url: str, http_url: str) -> None:
        self.grpc_url, self.http_url = grpc_url, http_url or grpc_url

    def __enter__(self) -> ExternalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def server_context(args: argparse.Namespace, repo: Path, log_dir: Path) -> Any:
    """The bundled tritonserver on free loopback ports, or ``--grpc-url``'s server."""
    if args.grpc_url:
        return ExternalServer(args.grpc_url, args.http_url)
    from serve.triton_server import ServerOptions, TritonServer, free_port

    opts = ServerOptions(
        model_repository=str(repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    return TritonServer(opts, log_path=log_dir / "bench-server.log")


def triton_levels(
    srv: Any, args: argparse.Namespace, inputs: BenchInputs, baseline: Level | None
) -> list[Level]:
    """The concurrency sweep over ``args.protocols`` x ``args.inputs`` against ``srv``."""
    import tritonclient.grpc as grpcclient

    model, batch = args.model, args.batch
    levels: list[Level] = []
    stats_client = grpcclient.InferenceServerClient(srv.grpc_url)
    # statistics (and shared-memory registration) are control-plane APIs: they need the key
    key = getattr(srv, "admin_key", None) or auth.resolve_key(srv.grpc_url)
    headers = auth.headers(key)
    try:
        for name, data in ((model, inputs.pixels), (image_model_name(model), inputs.raw)):
            with Classifier(srv.grpc_url, name) as clf:  # warm-up: first runs are slow
                for _ in range(5):
                    clf.logits(data[:batch])
        for protocol in args.protocols:
            url = srv.http_url if protocol == "http" else srv.grpc_url
            wire, shm = ("grpc", True) if protocol == "grpc-shm" else (protocol, False)
            for kind in args.inputs:
                if shm and kind == "raw":
                    continue  # shared memory carries pixel tensors; bytes go in the body
                target = model if kind == "tensor" else image_model_name(model)
                data = (inputs.pixels if kind == "tensor" else inputs.raw)[:batch]
                for conc in args.concurrency:
                    before = _server_stats(stats_client, model, headers)
                    m = measure(
                        lambda clf, b=data: clf.logits(b),
                        conc,
                        args.window,
                        args.max_seconds,
                        make_worker_state=lambda u=url, t=target, p=wire, x=shm: Classifier(
                            u, t, protocol=p, shared_memory=x, admin_key=key
                        ),
                    )
                    lv = level(f"triton-{protocol}", kind, batch, conc, m, inputs.card.precision)
                    lv.server = _delta(before, _server_stats(stats_client, model, headers))
                    if baseline is not None:
                        lv.ratio_to_onnxruntime = lv.throughput / baseline.throughput
                    levels.append(lv)
                    log.info(
                        "%-15s %-6s c=%-3d %7.1f img/s  p50 %7.1f  p99 %7.1f ms  x%.2f ORT  "
                        "errors %d%s",
                        lv.backend,
                        kind,
                        conc,
                        lv.throughput,
                        lv.p50_ms,
                        lv.p99_ms,
                        lv.ratio_to_onnxruntime or 0,
                        lv.errors,
                        "" if lv.stable else "  (not stable: time cap)",
                    )
    finally:
        stats_client.close()
    return levels


def new_report(args: argparse.Namespace, inputs: BenchInputs, gemm: dict[str, float]) -> dict:
    """The report skeleton: model, version, cost per image, machine, settings."""
    import time

    card = inputs.card
    return {
        "model": args.model,
        "version": int(inputs.version_dir.name),
        "arch": card.arch,
        "precision": card.precision,
        "gflop_per_image": card.gflop_per_image,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(gemm),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "load_generator": {"tool": "trainserve.loadgen (Python, closed loop)"},
        "results": [],
        "skipped": {},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The Triton sweep with the ONNX Runtime in-process baseline; returns the report."""
    repo = Path(args.model_repository)
    inputs = bench_inputs(repo, args.model, args.data, max(args.batch, 16))
    gemm = {"onnxruntime": gemm_gflops_onnxruntime()}
    report = new_report(args, inputs, gemm)
    log.info("machine: %s", report["machine"])
    baseline = onnxruntime_baseline(
        inputs.version_dir / "model.onnx",
        inputs.pixels,
        args.batch,
        args.window,
        args.max_seconds,
        inputs.card.precision,
    )
    report["results"].append(asdict(baseline))
    with server_context(args, repo, Path(args.out)) as srv:
        report["results"] += [asdict(lv) for lv in triton_levels(srv, args, inputs, baseline)]
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (shared with ``python -m export bench``)."""
    p.add_argument("--model", default="antsbees")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--data", default="", help="ImageFolder split with images to send (.../val)")
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
        help="bench a running server (e.g. the NGC container on a GPU host) instead of "
        "starting the bundled one",
    )
    p.add_argument("--http-url", default="", help="with --grpc-url: its HTTP address")
    p.add_argument("--out", default="bench")
    p.add_argument(
        "--table",
        default="",
        metavar="JSON",
        help="print the README table of a bench JSON (rows at --concurrency), exit",
    )


def main(args: argparse.Namespace) -> int:
    """``python -m serve bench``."""
    from serve.bench_report import markdown_table, write_report

    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text()), tuple(args.concurrency)))
        return 0
    report = run(args)
    paths = write_report(report, Path(args.out), args.model)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
