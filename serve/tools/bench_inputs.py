"""What ``make bench`` sends (real val images as tensors and encoded bytes, perf_analyzer's
``--input-data``) and the in-process baselines every served figure is a ratio to (ONNX
Runtime; decode + preprocess + ONNX Runtime) (torch-free)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve.backend.errors import UsageError
from serve.backend.preprocess import ResizeCrop, preprocess
from serve.client.evaluate import list_image_folder
from serve.core.card import ModelCard
from serve.core.files import atomic_write_json, latest_version
from serve.core.names import IMAGE_INPUT, INPUT_NAME
from serve.core.sampling import stratified
from serve.tools import perf_analyzer_profile as pa_profile
from serve.tools.loadgen import Level, level, measure

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
    return ModelCard.read(version_dir / "model_card.json")


def bench_inputs(repo: Path, model: str, data: str | Path, count: int = 16) -> BenchInputs:
    """``count`` images of the ImageFolder split ``data`` (a stratified sample: every
    class; tiled when it holds fewer), as the model's input pixels and as encoded bytes."""
    if not data:
        raise UsageError("give --data: an ImageFolder split with images to send (e.g. .../val)")
    version_dir = latest_version(repo / model)
    card = read_card(version_dir)
    pre = card.preprocessing
    geometry = ResizeCrop(pre.resize, pre.crop, pre.interpolation)
    _, samples = list_image_folder(data)
    paths = [samples[i][0] for i in stratified([label for _, label in samples], count)]
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
    return costed_level(
        "onnxruntime", "tensor", batch, lambda: session.run(None, {name: x}), window, cap, precision
    )


def costed_level(
    backend: str,
    kind: str,
    batch: int,
    once: Callable[[], Any],
    window: float,
    cap: float,
    precision: str,
) -> Level:
    """``once`` measured in a closed loop of one (:func:`measure`), with this process's
    CPU time per image over the measurement (``server["cpu_ms_per_image"]``: every
    thread's, as the serving processes' is counted)."""
    calls = [0]

    def counted(_: Any) -> None:
        once()
        calls[0] += 1

    cpu0 = time.process_time()
    m = measure(counted, 1, window, cap)
    cpu = time.process_time() - cpu0
    lv = level(backend, kind, batch, 1, m, precision)
    if calls[0]:
        lv.server["cpu_ms_per_image"] = 1000 * cpu / (calls[0] * batch)
    return lv


def image_pipeline_baseline(
    onnx_path: Path,
    raw: np.ndarray,
    geometry: ResizeCrop,
    batch: int,
    window: float,
    cap: float,
    precision: str = "fp32",
) -> Level:
    """The raw-image path's own limit: decode + preprocess (serve/backend/preprocess.py, what the
    server-side preprocess model runs) + ONNX Runtime, in one process, on the same
    encoded images and batch as the ``raw`` Triton levels."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = [bytes(r[0]) for r in raw[:batch]]

    def once() -> None:
        x = np.stack([preprocess(b, geometry) for b in images])
        session.run(None, {name: x})

    return costed_level("image-pipeline", "raw", batch, once, window, cap, precision)


def write_input_data(inputs: BenchInputs, model: str, out_dir: Path) -> dict[str, Path]:
    """``--input-data`` files of the real val images: ``tensor`` (the classifier's FP32
    pixels) and ``raw`` (the encoded files for the image pipeline's BYTES input)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = [np.ascontiguousarray(x, dtype="<f4").tobytes() for x in inputs.pixels]
    raw = [pa_profile.bytes_element(bytes(r[0])) for r in inputs.raw]
    files = {
        "tensor": pa_profile.input_data_json(INPUT_NAME, pixels),
        "raw": pa_profile.input_data_json(IMAGE_INPUT, raw, [1]),
    }
    return {k: atomic_write_json(out_dir / f"{model}-{k}.json", v) for k, v in files.items()}
