"""First-request latency after a load, with and without ``model_warmup``.

``python -m export warmup-bench --model-repository REPO --model NAME --data DIR/val``:
for each variant (the published configs with their warmup; the same configs with
``model_warmup`` removed) and each request kind (one val image as a pixel tensor to the
classifier; one encoded val image through the ``<name>_image`` pipeline), start a fresh
tritonserver on a copy of the repository ``--runs`` times and time

* ``load_s``: server start until ``/v2/health/ready`` (warmup runs inside the load),
* ``first_ms``: the first request after ready,
* ``steady_ms``: the median of the next ``--steady`` requests of the same kind.

The image sent is never one of the warmup images. Results go to
``bench/local/warmup-latest.json`` and ``.png`` (median over runs, with every run's numbers).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from serve.backend.errors import UsageError
from serve.backend.preprocess import IMAGE_EXTENSIONS, ResizeCrop, preprocess
from serve.core.errors import SetupError
from serve.core.files import atomic_write_json, versions
from serve.core.machine import cpu_model
from serve.core.model_config import config_text, parse_config
from serve.core.names import IMAGE_INPUT, INPUT_NAME, OUTPUT_NAME, image_model_name

log = logging.getLogger(__name__)

VARIANTS = ("with_warmup", "without_warmup")
KINDS = ("tensor", "image")


def strip_warmup(repo: Path) -> None:
    """Remove ``model_warmup`` from every config of a repository copy."""
    for cfg_path in repo.glob("*/config.pbtxt"):
        cfg = parse_config(cfg_path.read_text())
        cfg.ClearField("model_warmup")
        cfg_path.write_text(config_text(cfg))


def _copy(repo: Path, dst: Path, warmup: bool) -> Path:
    shutil.copytree(repo, dst, ignore=shutil.ignore_patterns(".lock", "__pycache__"))
    if not warmup:
        strip_warmup(dst)
    return dst


def _request(client: Any, name: str, kind: str, payload: np.ndarray) -> float:
    import tritonclient.grpc as grpcclient

    if kind == "tensor":
        inp = grpcclient.InferInput(INPUT_NAME, list(payload.shape), "FP32")
    else:
        inp = grpcclient.InferInput(IMAGE_INPUT, list(payload.shape), "BYTES")
    inp.set_data_from_numpy(payload)
    model = name if kind == "tensor" else image_model_name(name)
    t0 = time.perf_counter()
    result = client.infer(model, [inp])
    elapsed = (time.perf_counter() - t0) * 1e3
    if result.as_numpy(OUTPUT_NAME) is None:
        raise UsageError(f"{model} answered without {OUTPUT_NAME}")
    return elapsed


def one_start(repo: Path, name: str, kind: str, payload: np.ndarray, steady: int, log_path: Path):
    """Start a server on ``repo``, time load, first and steady requests, stop it."""
    import tritonclient.grpc as grpcclient

    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.triton_server import TritonServer

    opts = ServerOptions(
        model_repository=str(repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    t0 = time.perf_counter()
    server = TritonServer(opts, log_path=log_path).start(timeout=300)
    load_s = time.perf_counter() - t0
    try:
        client = grpcclient.InferenceServerClient(server.local_grpc_url)
        try:
            first = _request(client, name, kind, payload)
            rest = [_request(client, name, kind, payload) for _ in range(steady)]
        finally:
            client.close()
    finally:
        code = server.stop()
    if code != 0:
        raise SetupError(f"tritonserver exited {code}; log: {log_path}")
    return {
        "load_s": round(load_s, 3),
        "first_ms": round(first, 2),
        "steady_ms": round(statistics.median(rest), 2),
    }


def _payloads(repo: Path, name: str, data: Path) -> dict[str, np.ndarray]:
    """One val image that is not a warmup image: pixels [1, 3, H, W] and bytes [1, 1]."""
    from serve.core.card import ModelCard

    card_path = repo / name / str(versions(repo / name)[-1]) / "model_card.json"
    card = ModelCard.read(card_path)
    warm = {p.read_bytes()[4:] for p in (repo / f"{name}_preprocess" / "warmup").glob("*")}
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    image = next(p.read_bytes() for p in files if p.read_bytes() not in warm)
    p = card.preprocessing
    pixels = preprocess(image, ResizeCrop(p.resize, p.crop, p.interpolation))[None]
    return {"tensor": pixels, "image": np.array([[image]], dtype=object)}


def run(repo: Path, name: str, data: Path, runs: int, steady: int, out: Path) -> dict[str, Any]:
    """Every variant x kind x run; returns (and writes) the report."""
    from tqdm import tqdm

    payloads = _payloads(repo, name, data)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="warmup-bench-") as tmp:
        copies = {v: _copy(repo, Path(tmp) / v, v == "with_warmup") for v in VARIANTS}
        jobs = [(v, k, r) for r in range(runs) for v in VARIANTS for k in KINDS]
        for variant, kind, r in tqdm(jobs, desc="server starts"):
            log_path = Path(tmp) / f"{variant}-{kind}-{r}.log"
            m = one_start(copies[variant], name, kind, payloads[kind], steady, log_path)
            results.setdefault(variant, {}).setdefault(kind, {"runs": []})["runs"].append(m)
    for variant in results.values():
        for entry in variant.values():
            for key in ("load_s", "first_ms", "steady_ms"):
                entry[key] = round(statistics.median(m[key] for m in entry["runs"]), 3)
    report = {
        "model": name,
        "cpu": cpu_model(),
        "runs": runs,
        "steady_requests": steady,
        "warmup_batch_sizes": _warmup_sizes(repo / name),
        "results": results,
        "note": "median over runs; every run starts a fresh tritonserver on a copy of the "
        "repository (without_warmup: model_warmup removed from the configs)",
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "warmup-latest.json", report)
    plot(report, out / "warmup-latest.png")
    return report


def _warmup_sizes(model_dir: Path) -> list[int]:
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    return [int(w.batch_size) for w in cfg.model_warmup]


def plot(report: dict[str, Any], path: Path) -> None:
    """First-request vs steady latency per kind, with and without warmup."""
    from serve.core.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, firsts, steadies = [], [], []
    for variant in VARIANTS:
        for kind in KINDS:
            entry = report["results"][variant][kind]
            labels.append(f"{kind}\n{variant.replace('_', ' ')}")
            firsts.append(entry["first_ms"])
            steadies.append(entry["steady_ms"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, firsts, 0.4, label="first request after load")
    ax.bar(x + 0.2, steadies, 0.4, label="steady state (median)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report['model']}: first request after a load ({report['cpu']})", fontsize=9)
    ax.legend()
    save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m export warmup-bench``."""
    p.add_argument(
        "--model-repository",
        default="model_repository",
        help="Triton model repository (each start serves a copy)",
    )
    p.add_argument("--model", default="antsbees", help="the classifier (and its <model>_image)")
    p.add_argument("--data", required=True, help="folder of val images (not the warmup ones)")
    p.add_argument(
        "--runs", type=int, default=3, help="fresh server starts per variant and request kind"
    )
    p.add_argument(
        "--steady",
        type=int,
        default=10,
        help="requests after the first: the steady latency's median",
    )
    p.add_argument("--out", default="bench/local", help="folder of warmup-latest.json and .png")


def run_command(a: argparse.Namespace) -> int:
    """``python -m export warmup-bench``: measure, write the JSON + PNG, print the table."""
    report = run(Path(a.model_repository), a.model, Path(a.data), a.runs, a.steady, Path(a.out))
    for variant, kinds in report["results"].items():
        for kind, e in kinds.items():
            print(
                f"{variant:15s} {kind:6s} load {e['load_s']:.2f} s  first {e['first_ms']:.1f} ms"
                f"  steady {e['steady_ms']:.1f} ms"
            )
    return 0
