"""The ONNX cache: an unchanged checkpoint reuses its graph, anything else exports again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export.formats.onnx_cache import ENV, OnnxCache, cache_key
from export.formats.onnx_export import export_onnx, read_metadata
from serve.core.card import ModelCard
from serve.core.files import sha256
from train.models.archs import arch_options, build_model
from train.models.checkpoint import checkpoint_from_model, save_checkpoint


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model("resnet20", 10).eval()
    card = ModelCard.create(
        name="cached",
        arch="resnet20",
        classes=[str(i) for i in range(10)],
        resize=32,
        crop=32,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        arch_options=arch_options("resnet20", True),
    )
    save_checkpoint(checkpoint_from_model(model, card), path)
    return path


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _tiny() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph)


@pytest.mark.slow
def test_unchanged_checkpoint_reuses_the_graph(tmp_path: Path) -> None:
    from train.models.checkpoint import load_checkpoint

    cache = OnnxCache(tmp_path / "cache")
    a = _checkpoint(tmp_path / "a.pt", seed=0)
    first = export_onnx(
        load_checkpoint(a), tmp_path / "1.onnx", cache=cache, checkpoint_sha256=sha256(a)
    )
    assert not first.cached and cache.path(first.key).is_file()
    second = export_onnx(
        load_checkpoint(a), tmp_path / "2.onnx", cache=cache, checkpoint_sha256=sha256(a)
    )
    assert second.cached and second.key == first.key
    # Same graph, and the card metadata is attached to the reused one too.
    x = np.random.default_rng(0).uniform(0, 255, (3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(_logits(tmp_path / "1.onnx", x), _logits(tmp_path / "2.onnx", x))
    assert read_metadata(tmp_path / "2.onnx") == read_metadata(tmp_path / "1.onnx")
    assert read_metadata(tmp_path / "2.onnx")["model_card"]["name"] == "cached"
    # Other weights: another key, a fresh export with its own outputs.
    b = _checkpoint(tmp_path / "b.pt", seed=1)
    other = export_onnx(
        load_checkpoint(b), tmp_path / "3.onnx", cache=cache, checkpoint_sha256=sha256(b)
    )
    assert not other.cached and other.key != first.key
    assert not np.array_equal(_logits(tmp_path / "3.onnx", x), _logits(tmp_path / "1.onnx", x))
    # No cache (or no checkpoint hash): always exported.
    assert not export_onnx(load_checkpoint(a), tmp_path / "4.onnx").cached


def test_key_covers_opset_and_checkpoint() -> None:
    assert cache_key("a" * 64, 18) == cache_key("a" * 64, 18)
    assert cache_key("a" * 64, 18) != cache_key("a" * 64, 17)
    assert cache_key("a" * 64, 18) != cache_key("b" * 64, 18)


def test_cache_location_and_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert OnnxCache.resolve().root == tmp_path / "env"
    assert OnnxCache.resolve(str(tmp_path / "flag")).root == tmp_path / "flag"
    assert OnnxCache.resolve("off") is None
    monkeypatch.setenv(ENV, "off")
    assert OnnxCache.resolve() is None
    monkeypatch.delenv(ENV)
    assert OnnxCache.resolve().root == Path.home() / ".cache" / "trainserve" / "onnx"


def test_broken_entries_are_misses_and_old_ones_are_pruned(tmp_path: Path) -> None:
    broken = OnnxCache(tmp_path / "broken")
    broken.root.mkdir()
    broken.path("k").write_bytes(b"not a protobuf \xff\xfe")
    assert broken.get("k") is None and broken.get("missing") is None
    cache = OnnxCache(tmp_path / "lru", keep=2)
    for i, key in enumerate(("k1", "k2")):
        cache.put(key, _tiny())
        os.utime(cache.path(key), (1_000_000 + i, 1_000_000 + i))  # k1 oldest
    assert cache.get("k1") is not None  # a hit makes k1 the most recently used
    cache.put("k3", _tiny())
    assert sorted(p.stem for p in cache.root.glob("*.onnx")) == ["k1", "k3"]
    # An unwritable cache is a warning, not an export failure.
    blocked = tmp_path / "file"
    blocked.write_text("x")
    OnnxCache(blocked / "sub").put("k", _tiny())
