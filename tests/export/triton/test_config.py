"""Model warmup from real val images, one TensorRT plan per compute capability,
the ONNX Runtime TensorRT engine cache - every generated config parsed strictly - and the
real server warming the published model up."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.formats.tensorrt_engine import (
    EngineProfile,
    mismatches,
    plan_filename,
    repository_plans,
    tensorrt_status,
)
from export.triton.config import (
    ServingConfig,
    add_warmup,
    classifier_config,
    ensemble_config,
    preprocess_config,
    set_plans,
)
from export.triton.warmup import build_warmup
from serve.backend.preprocess import ResizeCrop, preprocess
from serve.core.model_config import config_text, parse_config
from tests.helpers import example_card, run_cli, wait_until

TRT_OK, TRT_WHY = tensorrt_status()


def _roundtrip(cfg):
    return parse_config(config_text(cfg))  # strict: unknown fields are errors


def _val_image(hymenoptera: Path, cls: str = "bees", index: int = 0) -> bytes:
    return sorted((hymenoptera / "val" / cls).iterdir())[index].read_bytes()


def test_warmup_files_are_in_tritons_input_data_file_format(hymenoptera: Path) -> None:
    images = [_val_image(hymenoptera, "ants"), _val_image(hymenoptera, "bees")]
    warm = build_warmup(images, example_card(), [1, 8, 32])
    # Batch 1 and each preferred size, cycling through the real images.
    assert [s.batch_size for s in warm.classifier.samples] == [1, 8, 32]
    assert [s.batch_size for s in warm.preprocess.samples] == [1, 8, 32]
    for sample, image in zip(warm.classifier.samples, [*images, images[0]], strict=True):
        raw = warm.classifier.files[sample.input_data_file]
        assert len(raw) == 3 * 224 * 224 * 4  # one FP32 item; Triton repeats it batch_size times
        pixels = np.frombuffer(raw, dtype="<f4").reshape(3, 224, 224)
        expected = preprocess(image, ResizeCrop(256, 224, "bilinear"))
        assert np.array_equal(pixels, expected)  # the served preprocessing, not random data
    for sample, image in zip(warm.preprocess.samples, [*images, images[0]], strict=True):
        raw = warm.preprocess.files[sample.input_data_file]
        (length,) = struct.unpack("<I", raw[:4])  # BYTES: uint32 LE length, then the bytes
        assert length == len(image) and raw[4:] == image
    assert build_warmup([], example_card(), []).classifier.files == {}
    with pytest.raises(ValueError, match="at least one"):
        build_warmup([], example_card(), [1])


def test_every_generated_config_parses_strictly_with_warmup(hymenoptera: Path) -> None:
    card = example_card()
    warm = build_warmup([_val_image(hymenoptera)], card, [1, 16])
    serving = ServingConfig(preferred_batch_sizes=[16])
    assert serving.warmup_batch_sizes == [1, 16]
    assert ServingConfig(warmup=False).warmup_batch_sizes == []
    clf = _roundtrip(add_warmup(classifier_config("m", card, serving), warm.classifier.samples))
    assert [(w.name, w.batch_size) for w in clf.model_warmup] == [
        ("val_image_batch1", 1),
        ("val_image_batch16", 16),
    ]
    w = clf.model_warmup[1].inputs["input"]
    assert w.data_type == mc.TYPE_FP32
    assert list(w.dims) == [3, 224, 224] and w.input_data_file == "input_batch16.fp32"
    pre = _roundtrip(add_warmup(preprocess_config("m", card, serving), warm.preprocess.samples))
    (inp,) = pre.input
    wi = pre.model_warmup[0].inputs[inp.name]
    assert wi.data_type == inp.data_type and list(wi.dims) == [1]
    assert wi.input_data_file == "IMAGE_batch1.bytes"
    ens = _roundtrip(ensemble_config("m", card, serving))
    assert not ens.model_warmup  # Triton warms the ensemble's composing models, not it


def test_gpu_configs_plans_per_compute_capability_and_engine_cache(hymenoptera: Path) -> None:
    card = example_card()
    warm = build_warmup([_val_image(hymenoptera)], card, [1, 16, 64])
    serving = ServingConfig(
        max_batch_size=64, target="gpu", gpu_backend="tensorrt", preferred_batch_sizes=[16, 64]
    )
    trt = classifier_config("m", card, serving)
    set_plans(trt, {"9.0": "model.sm90.plan", "8.0": "model.sm80.plan"})
    add_warmup(trt, warm.classifier.samples)
    trt = _roundtrip(trt)
    assert trt.platform == "tensorrt_plan" and trt.default_model_filename == "model.plan"
    assert dict(trt.cc_model_filenames) == {"8.0": "model.sm80.plan", "9.0": "model.sm90.plan"}
    assert [w.batch_size for w in trt.model_warmup] == [1, 16, 64]
    ort = _roundtrip(
        classifier_config(
            "m",
            card,
            ServingConfig(target="gpu", gpu_backend="onnxruntime", trt_engine_cache_path="/cache"),
        )
    )
    (accel,) = ort.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt"
    assert accel.parameters["trt_engine_cache_enable"] == "1"
    assert accel.parameters["trt_engine_cache_path"] == "/cache/m"  # one folder per model


def test_plan_names_and_repository_plans(tmp_path: Path) -> None:
    assert plan_filename({"compute_capability": "9.0"}) == "model.sm90.plan"
    assert plan_filename({"compute_capability": "8.6"}) == "model.sm86.plan"
    hw = {"compute_capability": "8.0", "hardware_compatibility_level": "ampere_plus"}
    assert plan_filename(hw) == "model.plan"  # the config's fallback for any other GPU
    assert plan_filename({}) == "model.plan"
    # Two versions with plans for different GPUs: the config lists the union.
    for version, cc in (("1", "8.0"), ("1", "9.0"), ("2", "9.0")):
        d = tmp_path / version
        d.mkdir(exist_ok=True)
        name = plan_filename({"compute_capability": cc})
        (d / f"{name}.json").write_text(json.dumps({"compute_capability": cc}))
    assert repository_plans(tmp_path) == {"8.0": "model.sm80.plan", "9.0": "model.sm90.plan"}
    with pytest.raises(ValueError, match="hardware compatibility"):
        EngineProfile(hardware_compatibility="turing_plus")


def test_compatible_engines_relax_the_platform_check() -> None:
    built = {"tensorrt_version": "10.5.0", "compute_capability": "8.0", "gpu_name": "A100"}
    newer = {"tensorrt_version": "10.7.0", "compute_capability": "8.0", "gpu_name": "A100"}
    assert len(mismatches(built, newer)) == 1  # a plain engine: TensorRT version must match
    vc = {**built, "version_compatible": True}
    assert mismatches(vc, newer) == []  # a later 10.x runs it
    assert len(mismatches(vc, {**newer, "tensorrt_version": "10.4.0"})) == 1  # not older
    assert len(mismatches(vc, {**newer, "tensorrt_version": "11.0.0"})) == 1  # nor next major
    hw = {**built, "hardware_compatibility_level": "ampere_plus"}
    h100 = {**built, "compute_capability": "9.0", "gpu_name": "H100"}
    assert mismatches(hw, h100) == [] and len(mismatches(built, h100)) == 1
    t4 = {**built, "compute_capability": "7.5", "gpu_name": "T4"}
    assert len(mismatches(hw, t4)) == 1  # Ampere and later only


@pytest.mark.skipif(TRT_OK, reason="checks the message shown where TensorRT is missing")
def test_adding_a_plan_without_tensorrt_is_refused_before_reading(tmp_path: Path) -> None:
    proc = run_cli(
        "export",
        "trt",
        "--name",
        "antsbees",
        "--model-repository",
        str(tmp_path / "absent"),
        "--data",
        str(tmp_path),
        check=False,
    )
    assert proc.returncode == 2 and "TensorRT is not installed" in proc.stderr
    assert not (tmp_path / "absent").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"adding a plan needs TensorRT + a CUDA GPU: {TRT_WHY}")
def test_trt_adds_this_gpus_plan_to_a_published_version(
    trained_run: Path, tmp_path: Path, hymenoptera: Path
) -> None:
    repo = tmp_path / "repo"
    run_cli(
        "export",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--out-dir",
        str(tmp_path / "out"),
        "--model-repository",
        str(repo),
        "--target",
        "gpu",
        "--fp16-tolerance",
        "0.01",
    )
    version = repo / "antsbees" / "1"
    meta_files = sorted(version.glob("model.sm*.plan.json"))
    assert len(meta_files) == 1 and (version / "model.onnx").is_file()
    cc = json.loads(meta_files[0].read_text())["compute_capability"]
    (version / meta_files[0].name[: -len(".json")]).unlink()  # as if built on another GPU
    meta_files[0].unlink()
    proc = run_cli(
        "export",
        "trt",
        "--name",
        "antsbees",
        "--model-repository",
        str(repo),
        "--data",
        str(hymenoptera),
        "--parity-limit",
        "64",
    )
    assert "passed" in proc.stdout
    cfg = parse_config((repo / "antsbees" / "config.pbtxt").read_text())
    plan = cfg.cc_model_filenames[cc]
    assert (version / plan).is_file()
    meta = json.loads((version / f"{plan}.json").read_text())
    assert meta["parity"]["status"] == "passed" and meta["parity"]["images"] == 64
    card = json.loads((version / "model_card.json").read_text())
    assert plan in card["files"]


def test_published_model_warms_up_on_the_real_server(
    model_repo: Path, tmp_path: Path, hymenoptera: Path
) -> None:
    """The export publishes warmup files; tritonserver runs them while loading (its log
    says so, per model) and the model then answers a real image."""
    import tritonclient.grpc as grpcclient

    from serve.runtime.handle import free_port
    from serve.runtime.server_options import ServerOptions
    from serve.runtime.triton_server import TritonServer

    for model, suffix in (("antsbees", "fp32"), ("antsbees_preprocess", "bytes")):
        cfg = parse_config((model_repo / model / "config.pbtxt").read_text())
        assert [w.batch_size for w in cfg.model_warmup] == [1]
        (w,) = cfg.model_warmup
        (entry,) = w.inputs.values()
        assert (model_repo / model / "warmup" / entry.input_data_file).is_file()
        assert entry.input_data_file.endswith(suffix)
    opts = ServerOptions(
        model_repository=str(model_repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_verbose=1,
    )
    log = tmp_path / "server.log"
    with TritonServer(opts, log_path=log) as server:
        for model in ("antsbees", "antsbees_preprocess"):
            line = (
                f"model '{model}' instance {model}_0_0 is running warmup sample 'val_image_batch1'"
            )
            wait_until(lambda s=line: s in log.read_text(errors="replace"), 10, f"{model} warmup")
        client = grpcclient.InferenceServerClient(server.local_grpc_url)
        try:
            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            bees = _val_image(hymenoptera, "bees", 3)
            inp.set_data_from_numpy(np.array([[bees]], dtype=object))
            logits = client.infer("antsbees_image", [inp]).as_numpy("logits")
        finally:
            client.close()
    assert logits.shape == (1, 2) and np.isfinite(logits).all()
