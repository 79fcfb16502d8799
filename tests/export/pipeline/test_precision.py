"""FP16 stages, the TensorRT path (runs where TensorRT and a GPU exist), GPU and
CPU model repositories, and the release parity report across every stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from export.formats.int8 import Calibration
from export.formats.onnx_export import read_metadata
from export.formats.tensorrt_engine import EngineProfile, mismatches, tensorrt_status
from export.pipeline.config import ExportConfig, PrecisionConfig
from export.pipeline.release import run_export
from export.triton.config import ServingConfig, classifier_config
from serve.core.card import ModelCard
from serve.core.files import versions
from serve.core.model_config import config_text, parse_config
from tests.helpers import ROOT, SHARED, run_cli
from train.models.archs import build_model
from train.models.checkpoint import checkpoint_from_model, save_checkpoint

STAGES = [
    "onnxruntime-fp32",
    "onnxruntime-fp16",
    "pytorch-fp16",
    "onnxruntime-int8",
    "onnxruntime-int8-tensorrt",
    "tensorrt-fp16",
    "triton-http",
    "triton-grpc",
    "triton-image",
]
TRT_OK, TRT_WHY = tensorrt_status()


def test_release_report_covers_every_stage(trained_run: Path, model_repo: Path) -> None:
    report = json.loads((trained_run / "parity.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    assert list(by_name) == STAGES  # nothing silently dropped
    assert report["passed"] is True and report["target"] == "cpu"
    for s in report["stages"]:
        if s["status"] == "skipped":
            assert s["reason"], s
        elif s["name"] in ("onnxruntime-fp16", "pytorch-fp16"):
            # The published CPU model runs in FP32: reduced stages are measured, not enforced,
            # and judged by accuracy (agreement + labelled accuracy), not element-wise - on
            # a stratified sample of 32 val images (--advisory sample, the default)
            assert s["gating"] is False and s["status"] in ("passed", "failed")
            assert s["images"] == 32 and s["reference"] == "pytorch-fp32"
            assert s["gate"] == "accuracy" and s["thresholds"]["min_agreement"] == 0.995
            # the reference's accuracy on the same sample (not on all images)
            assert 0.5 < s["reference_accuracy"] <= 1.0
            assert (s["reference_accuracy"] * 32) == pytest.approx(
                round(s["reference_accuracy"] * 32)
            )
            assert set(s["per_class_accuracy"]) == {"ants", "bees"}
            assert s["max_abs"] > 1e-5  # really differs from FP32 (not a copy)
            if "fp16" in s["name"]:
                assert s["top1_agreement"] >= 0.99 and s["median_rel"] < 0.01
            else:
                assert s["top1_agreement"] >= 0.9 and s["max_abs_scaled"] > 0
        else:
            assert s["status"] == "passed" and s["gating"] is True, s
    # INT8 is not published at PRECISION=fp32: not quantized at all (--advisory all would)
    for name in ("onnxruntime-int8", "onnxruntime-int8-tensorrt"):
        assert by_name[name]["status"] == "skipped", by_name[name]
        assert by_name[name]["reason"].startswith("advisory (INT8 is not published)")
    # where the time went: every step and stage, kept in parity.json
    timings = report["timings"]
    assert {"pytorch-fp32", "onnxruntime-fp32", "pytorch-fp16"} <= set(timings["stages_s"])
    assert all(v >= 0 for v in [*timings["steps_s"].values(), *timings["stages_s"].values()])
    if not TRT_OK:
        assert by_name["tensorrt-fp16"]["status"] == "skipped"
        assert by_name["tensorrt-fp16"]["reason"].startswith(TRT_WHY)
    for protocol in ("http", "grpc", "image"):  # the real server returns ORT's numbers exactly
        stage = by_name[f"triton-{protocol}"]
        assert stage["reference"] == "onnxruntime-fp32" and stage["images"] == 153
        assert stage["max_abs"] == 0.0
    md = (trained_run / "parity.md").read_text()
    assert all(f"| {name} |" in md for name in STAGES)
    assert (trained_run / "parity.png").read_bytes().startswith(b"\x89PNG")
    card = ModelCard.from_dict(
        json.loads((model_repo / "antsbees" / "1" / "model_card.json").read_text())
    )
    assert card.parity is not None and [s["name"] for s in card.parity.stages] == STAGES


def test_fp16_onnx_graph(trained_run: Path, model_repo: Path) -> None:
    proto = onnx.load(str(trained_run / "model_fp16.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    io_types = {v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)}
    assert io_types == {onnx.TensorProto.FLOAT}  # FP32 in and out, FP16 inside
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert read_metadata(trained_run / "model_fp16.onnx")["precision"] == "fp16"


@pytest.mark.slow
@pytest.mark.long
def test_fp16_parity_on_a_cifar_model(tmp_path: Path) -> None:
    """The pretrained CIFAR ResNet-20 through every stage that runs here."""
    (weights,) = (SHARED / "pretrained" / "cifar10_resnets").glob("resnet20-*.th")
    state = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    model = build_model("resnet20", 10)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    test_npz = SHARED / "cifar10" / "test.npz"
    classes = (SHARED / "cifar10" / "classes.txt").read_text().split()
    card = ModelCard.create(
        name="cifar10_resnet20",
        arch="resnet20",
        classes=classes,
        resize=32,
        crop=32,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        arch_options={"batchnorm": True},
    )
    ckpt = checkpoint_from_model(model, card, config={"data": str(test_npz)})
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    report = run_export(
        ExportConfig(
            checkpoint=str(tmp_path / "checkpoint.pt"),
            repository=str(tmp_path / "repo"),
            parity_limit=2000,
            advisory_sample=500,
            workers=0,
            # INT8 calibrates on training images, never on the test file judged here.
            precision=PrecisionConfig(
                calibration=Calibration(count=32), calibration_data=str(SHARED / "cifar10")
            ),
        )
    )
    by_name = {s["name"]: s for s in report["stages"]}
    assert report["passed"] and 0.80 < report["reference_top1"] < 0.86
    for name in ("onnxruntime-fp16", "pytorch-fp16"):
        assert by_name[name]["top1_agreement"] >= 0.995
        assert by_name[name]["median_rel"] < 0.01
    assert by_name["pytorch-fp16"]["images"] == 500
    # a stratified sample (these arrays are sorted by class: the first 500 would be one
    # class and their accuracy anything)
    for name in ("onnxruntime-fp16", "pytorch-fp16"):
        assert abs(by_name[name]["accuracy"] - report["reference_top1"]) < 0.06, by_name[name]
    assert by_name["triton-grpc"]["max_abs"] == 0.0
    # For an FP16 target the FP16 stages gate publishing, by accuracy: these logits are ~10,
    # so FP16 rounding alone gives a median |diff| ~5e-3 (Polygraphy's 1e-3 guidance would
    # refuse), yet agreement and accuracy hold and the version is published.
    gpu = ServingConfig(target="gpu", gpu_backend="onnxruntime")
    common = dict(
        checkpoint=str(tmp_path / "checkpoint.pt"),
        repository=str(tmp_path / "gpu"),
        parity_limit=500,
        advisory_sample=200,
        workers=0,
        serving=gpu,
        out_dir=str(tmp_path / "gpu_out"),
    )
    report = run_export(ExportConfig(**common, precision=PrecisionConfig(int8=False)))
    assert report["passed"] and report["published"].endswith("cifar10_resnet20/1")
    stage = next(s for s in report["stages"] if s["name"] == "onnxruntime-fp16")
    assert stage["gating"] is True and stage["status"] == "passed" and stage["median_abs"] > 1e-3
    assert stage["top1_agreement"] >= 0.995
    assert stage["accuracy_drop"] <= stage["thresholds"]["allowed_drop"] == 0.005


def _card(num_classes: int = 2) -> ModelCard:
    return ModelCard.create(
        name="m",
        arch="resnet18",
        classes=[f"c{i}" for i in range(num_classes)],
        resize=256,
        crop=224,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    )


def test_cpu_and_gpu_configs_parse_strictly() -> None:
    cpu = parse_config(config_text(classifier_config("m", _card(), ServingConfig())))
    assert cpu.backend == "python" and cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU
    profile = EngineProfile(1, 16, 64)
    trt = parse_config(
        config_text(
            classifier_config(
                "m",
                _card(),
                ServingConfig(
                    max_batch_size=profile.max_batch,
                    target="gpu",
                    gpu_backend="tensorrt",
                    preferred_batch_sizes=[16, 64],
                ),
            )
        )
    )
    assert trt.platform == "tensorrt_plan" and trt.max_batch_size == 64
    assert trt.instance_group[0].kind == trt.instance_group[0].KIND_GPU
    assert list(trt.dynamic_batching.preferred_batch_size) == [16, 64]
    assert trt.input[0].format == trt.input[0].FORMAT_NCHW
    assert trt.output[0].label_filename == "labels.txt"
    ort = parse_config(
        config_text(
            classifier_config("m", _card(), ServingConfig(target="gpu", gpu_backend="onnxruntime"))
        )
    )
    assert ort.backend == "onnxruntime"
    (accel,) = ort.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    with pytest.raises(ValueError, match="preferred batch sizes"):
        ServingConfig(max_batch_size=8, preferred_batch_sizes=[16])


@pytest.mark.long
def test_export_gpu_onnxruntime_target_here(trained_run: Path, tmp_path: Path) -> None:
    repo = tmp_path / "gpu_repo"
    proc = run_cli(
        "export",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--out-dir",
        str(tmp_path / "out"),
        "--model-repository",
        str(repo),
        "--target",
        "gpu",
        "--gpu-backend",
        "onnxruntime",
        "--parity-limit",
        "32",
        "--advisory-sample",
        "16",
        "--fp16-tolerance",
        "0.05",
        "--no-int8-stage",  # a CPU-only advisory stage; test_int8 covers it
    )
    assert "published antsbees version 1 (gpu-onnxruntime)" in proc.stderr
    cfg = parse_config((repo / "antsbees" / "config.pbtxt").read_text())
    assert cfg.backend == "onnxruntime" and cfg.parameters["target"].string_value == (
        "gpu-onnxruntime"
    )
    assert sorted(p.name for p in (repo / "antsbees" / "1").iterdir()) == [
        "model.onnx",
        "model_card.json",
        "report",  # this version's own parity report, kept beside it
    ]
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    triton = [s for s in report["stages"] if s["name"].startswith("triton")]
    assert all(s["status"] == "skipped" and "NGC" in s["reason"] for s in triton)
    # A CPU version cannot join the GPU model: one config.pbtxt serves every version.
    proc = run_cli(
        "export",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--out-dir",
        str(tmp_path / "out"),
        "--model-repository",
        str(repo),
        "--parity-limit",
        "16",
        "--advisory-sample",
        "8",
        "--no-int8-stage",
        "--no-triton-parity",
        check=False,
    )
    assert proc.returncode == 2 and "holds gpu-onnxruntime versions" in proc.stderr
    assert versions(repo / "antsbees") == [1]


@pytest.mark.skipif(TRT_OK, reason="checks the message shown where TensorRT is missing")
def test_tensorrt_target_without_tensorrt_is_refused_clearly(
    trained_run: Path, tmp_path: Path, model_repo: Path
) -> None:
    proc = run_cli(
        "export",
        "--checkpoint",
        str(trained_run / "checkpoint.pt"),
        "--out-dir",
        str(tmp_path),
        "--model-repository",
        str(tmp_path / "repo"),
        "--target",
        "gpu",
        "--parity-limit",
        "8",
        "--advisory-sample",
        "8",
        check=False,
    )
    assert proc.returncode == 2
    assert "needs TensorRT and a GPU" in proc.stderr and "--gpu-backend onnxruntime" in proc.stderr
    assert not (tmp_path / "repo" / "antsbees").exists()
    proc = run_cli(
        "export",
        "trt",
        "--onnx",
        str(trained_run / "model.onnx"),
        "--out",
        str(tmp_path / "m.plan"),
        check=False,
    )
    assert proc.returncode == 2 and "TensorRT" in proc.stderr


def test_engine_platform_mismatch_is_named() -> None:
    built = {"tensorrt_version": "10.5.0", "compute_capability": "8.0", "gpu_name": "A100"}
    here = {"tensorrt_version": "10.7.0", "compute_capability": "9.0", "gpu_name": "H100"}
    problems = mismatches(built, here)
    assert len(problems) == 2
    assert "tensorrt_version '10.5.0' (here '10.7.0'" in problems[0]
    assert "compute_capability '8.0' (here '9.0'" in problems[1] and "A100" in problems[1]
    assert mismatches(built, {**built}) == []


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT FP16 engine test needs TensorRT + GPU: {TRT_WHY}")
def test_tensorrt_engine_build_parity_and_refusal(trained_run: Path, tmp_path: Path) -> None:
    from export.formats.tensorrt_engine import EngineMismatch, check_compatible

    out = tmp_path / "out"
    report = run_export(
        ExportConfig(
            checkpoint=str(trained_run / "checkpoint.pt"),
            out_dir=str(out),
            repository=str(tmp_path / "repo"),
            serving=ServingConfig(
                max_batch_size=64,
                target="gpu",
                gpu_backend="tensorrt",
                preferred_batch_sizes=[16, 64],
            ),
            timing_cache=str(tmp_path / "timing.cache"),
            fp16_tolerance=1e-2,
        )
    )
    stage = next(s for s in report["stages"] if s["name"] == "tensorrt-fp16")
    assert stage["status"] == "passed" and stage["gating"] is True
    assert stage["top1_agreement"] >= 0.995 and stage["median_rel"] < 1e-2
    meta = json.loads((out / "model.plan.json").read_text())
    assert meta["precision"] == "fp16" and meta["profile"]["max_batch"] == 64
    # strongly typed: built from the accuracy-gated FP16 graph, no FP16 builder flag
    assert meta["strongly_typed"] is True and meta["onnx"].endswith("model_fp16.onnx")
    version = tmp_path / "repo" / "antsbees" / "1"
    assert len(list(version.glob("model.sm*.plan"))) == 1  # one plan per compute capability
    meta["tensorrt_version"] = "0.0.0"
    (out / "model.plan.json").write_text(json.dumps(meta))
    with pytest.raises(EngineMismatch, match="tensorrt_version '0.0.0'"):
        check_compatible(out / "model.plan")


def test_gpu_compose_file_serves_the_repository() -> None:
    compose = yaml.safe_load((ROOT / "serve" / "deploy" / "docker-compose.gpu.yml").read_text())
    svc = compose["services"]["triton"]
    # the first release clear of every published Triton security bulletin
    assert svc["image"] == "${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:26.07-py3}"
    assert "--model-repository=/models" in svc["command"]
    volume = next(v for v in svc["volumes"] if v.endswith(":/models:ro"))
    # compose resolves a relative path from the file's folder: the default is the repo's
    default = volume.split(":-", 1)[1].split("}", 1)[0]
    assert (ROOT / "serve" / "deploy" / default).resolve() == (ROOT / "model_repository")
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])


def test_fp16_onnx_differs_from_fp32_but_stays_close(model_repo: Path, trained_run: Path) -> None:
    """The FP16 ONNX really is a different model (weights rounded), and a close one."""
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(0, 255, (4, 3, 224, 224)).astype(np.float32)
    outs = [
        ort.InferenceSession(str(trained_run / f), providers=["CPUExecutionProvider"]).run(
            None, {"input": x}
        )[0]
        for f in ("model.onnx", "model_fp16.onnx")
    ]
    assert not np.array_equal(*outs)
    assert np.abs(outs[0] - outs[1]).max() < 0.05
