"""Every architecture through export -> ONNX Runtime parity (trained weights where we
have them, BatchNorm-calibrated random weights otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.pipeline.config import ExportConfig, PrecisionConfig
from export.pipeline.release import run_export
from serve.core.card import ModelCard
from serve.core.model_config import parse_config
from tests.helpers import CIFAR, SHARED
from train.data.datasets import dataset_split
from train.data.preprocess import Preprocess
from train.models.archs import ARCHS, arch_options, build_model
from train.models.checkpoint import checkpoint_from_model, save_checkpoint

pytestmark = pytest.mark.slow  # trains or exports real models: not in `make test-fast`

TEST_NPZ = CIFAR / "test.npz"
PRETRAINED = SHARED / "pretrained" / "cifar10_resnets"
TRAINED = ("resnet20", "resnet32", "resnet44", "resnet56")


def _weights(arch: str) -> Path:
    (path,) = PRETRAINED.glob(f"{arch}-*.th")
    return path


def _calibrated(
    arch: str, batchnorm: bool, images: torch.Tensor, extra: dict | None = None
) -> torch.nn.Module:
    """Random weights with BatchNorm statistics measured on real images (like a trained
    net's), so activations have realistic scale and the parity numbers mean something."""
    torch.manual_seed(0)
    model = build_model(arch, 10, **arch_options(arch, batchnorm, **(extra or {})))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in images.split(64):
            model(chunk)
    return model.eval()


# `make test` exports one architecture of each kind (the ImageNet-family defaults, a
# trained CIFAR ResNet, a plain conv net without BatchNorm, a CIFAR ResNet-18); the 32 px
# GoogLeNet's representative is tests/train/test_googlenet.py's end-to-end test (trained
# with aux heads, exported, parity, served). The others are the same code path per
# architecture: `make test-all` (marker exhaustive), e.g. the full-width and the
# naive-Inception GoogLeNet (~10x the FLOPs).
REPRESENTATIVE = {
    ("resnet18", True),
    ("efficientnet_lite0", True),
    ("resnet20", True),
    ("resnet18_cifar", True),
    ("vgg11", False),
}
# GoogLeNet variants beyond the representative one at a quarter of the widths (the same
# ops; the naive modules at full width cost ~32 GFLOPs per image)
SMALL_GOOGLENET = {"width": 0.25}
EXPORT_CASES = [
    pytest.param(
        a,
        bn,
        extra,
        marks=(
            pytest.mark.long  # a second ImageNet arch: ~45 s with a busy core
            if (a, bn) == ("efficientnet_lite0", True) and not extra
            else ()
            if (a, bn) in REPRESENTATIVE and not extra
            else pytest.mark.exhaustive
        ),
        id=f"{a}-{bn}" + "".join(f"-{k}{v}" for k, v in extra.items()),
    )
    for a, bn, extra in [(a, True, {}) for a in ARCHS]
    + [(a, False, {}) for a in ("resnet20", "resnet18_cifar", "vgg11", "alexnet")]
    + [
        ("googlenet_cifar", False, SMALL_GOOGLENET),
        ("googlenet_cifar", True, {"inception": "naive", **SMALL_GOOGLENET}),
    ]
]


@pytest.mark.parametrize(("arch", "batchnorm", "extra"), EXPORT_CASES)
def test_every_arch_exports_and_passes_parity(
    arch: str, batchnorm: bool, extra: dict, tmp_path: Path, hymenoptera: Path
) -> None:
    spec = ARCHS[arch]
    imagenet = spec.family == "imagenet"
    data = hymenoptera if imagenet else TEST_NPZ
    pre = Preprocess(resize=spec.resize, crop=spec.crop, augment=spec.augment)
    ds = dataset_split(data, "val", pre.eval_transform())
    classes = list(ds.classes)
    calib = torch.stack([ds[i][0] for i in range(0, len(ds), max(1, len(ds) // 128))])
    if arch in TRAINED and batchnorm:  # real trained weights where we have them
        model = build_model(arch, 10)
        sd = torch.load(_weights(arch), map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
        pre = Preprocess(resize=32, crop=32, augment="pad-crop")  # ImageNet mean/std
    else:
        model = _calibrated(arch, batchnorm, calib, extra)
    if imagenet:
        from train.models.archs import replace_head

        replace_head(model, arch, len(classes))
        model.eval()
    card = ModelCard.create(
        name=f"p_{arch}",
        arch=arch,
        classes=classes,
        resize=pre.resize,
        crop=pre.crop,
        mean=list(pre.mean),
        std=list(pre.std),
        arch_options=arch_options(arch, batchnorm, **extra),
    )
    ckpt = checkpoint_from_model(model, card, config={"data": str(data)})
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    report = run_export(
        ExportConfig(
            checkpoint=str(tmp_path / "checkpoint.pt"),
            data=str(data),
            repository=str(tmp_path / "repo"),
            parity_limit=64 if imagenet else 256,
            workers=0,
            fp16=False,  # FP16 on random weights says little; FP32 parity is the point here
            triton_parity=False,
            # INT8 (calibration + fallback search, ~75 s per ImageNet arch) is test_int8's job;
            # CIFAR keeps it on (advisory stages all run) to check that the .npz case skips
            # with the reason
            precision=PrecisionConfig(int8=not imagenet),
            advisory="sample" if imagenet else "all",
        )
    )
    stage = report["stages"][0]
    assert stage["status"] == "passed", stage
    if not imagenet:  # an .npz holds only the judged images: no INT8 calibration set
        (int8,) = [s for s in report["stages"] if s["name"] == "onnxruntime-int8"]
        assert int8["status"] == "skipped" and "--calibration-data" in int8["reason"]
    assert stage["top1_agreement"] == 1.0 and stage["max_abs"] <= 1e-3
    cfg = parse_config((tmp_path / "repo" / f"p_{arch}" / "config.pbtxt").read_text())
    assert list(cfg.input[0].dims) == [3, spec.crop, spec.crop]
    assert list(cfg.output[0].dims) == [len(classes)]
