"""CIFAR architectures and data, pretrained CIFAR ResNets, recipes, resume, DDP,
AMP, and every architecture through train -> resume -> evaluate -> export -> parity."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import PY, ROOT, SHARED, run_cli
from train.config import TrainConfig
from train.data.datasets import dataset_split
from train.data.preprocess import Preprocess
from train.models.archs import ARCHS, arch_options, build_model
from train.models.checkpoint import load_checkpoint
from train.run.evaluate import evaluate_checkpoint, evaluate_weights
from train.run.trainer import Run

pytestmark = pytest.mark.slow  # trains or exports real models: not in `make test-fast`

CIFAR = SHARED / "cifar10"
TEST_NPZ = CIFAR / "test.npz"
PRETRAINED = SHARED / "pretrained" / "cifar10_resnets"
# The data README's figures for these weights on test.npz (JPEG-derived CIFAR-10 test set).
REFERENCE_TOP1 = {"resnet20": 81.03, "resnet32": 82.56, "resnet44": 82.67, "resnet56": 83.20}


@pytest.fixture(scope="session")
def cifar() -> Path:
    if not TEST_NPZ.is_file():
        pytest.fail(f"test data missing: {TEST_NPZ} (expected ../shared/data beside the checkout)")
    return CIFAR


def _weights(arch: str) -> Path:
    (path,) = PRETRAINED.glob(f"{arch}-*.th")
    return path


@pytest.mark.long
def test_pretrained_resnet20_cli_reproduces_reference(cifar: Path) -> None:
    proc = run_cli(
        "train",
        "evaluate",
        "--arch",
        "resnet20",
        "--weights",
        str(_weights("resnet20")),
        "--data",
        str(TEST_NPZ),
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 11 and lines[0].strip().startswith("airplane:")
    match = re.fullmatch(r"top-1: (\d+\.\d\d)%", lines[-1])
    assert match and abs(float(match.group(1)) - REFERENCE_TOP1["resnet20"]) <= 0.05


@pytest.mark.exhaustive  # ~1 min each on 10,000 images here; resnet20's CLI test stays in make test
@pytest.mark.parametrize("arch", ["resnet32", "resnet44", "resnet56"])
def test_pretrained_cifar_resnets_reproduce_reference(cifar: Path, arch: str) -> None:
    result = evaluate_weights(_weights(arch), arch, TEST_NPZ, verbose=False, workers=0)
    assert result["images"] == 10000
    assert abs(100 * result["top1"] - REFERENCE_TOP1[arch]) <= 0.05


def test_raw_weights_need_their_normalization(cifar: Path, tmp_path: Path) -> None:
    state = torch.load(_weights("resnet20"), map_location="cpu", weights_only=True)
    copy = tmp_path / "unknown.pt"
    torch.save({"state_dict": {k: v + 0 for k, v in state["state_dict"].items()}}, copy)
    torch.save(state["state_dict"], copy)  # same tensors, but not the published file
    proc = run_cli(
        "train",
        "evaluate",
        "--arch",
        "resnet20",
        "--weights",
        str(copy),
        "--data",
        str(TEST_NPZ),
        check=False,
    )
    assert proc.returncode == 2 and "--mean and --std" in proc.stderr
    proc = run_cli(
        "train",
        "evaluate",
        "--arch",
        "resnet32",
        "--weights",
        str(_weights("resnet20")),
        "--data",
        str(TEST_NPZ),
        check=False,
    )
    assert proc.returncode == 2 and "resnet20 weights, not resnet32" in proc.stderr


def test_npz_and_imagefolder_sources(cifar: Path, hymenoptera: Path) -> None:
    pre = Preprocess(resize=32, crop=32, augment="pad-crop")
    train = dataset_split(cifar, "train", pre.train_transform())
    val = dataset_split(cifar, "val", pre.eval_transform())
    assert (len(train), len(val)) == (5000, 10000)  # train_subset_5k.npz / test.npz
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y == 0
    with pytest.raises(FileNotFoundError, match="pass --download when online"):
        dataset_split(cifar, "train", None, kind="cifar100")


# `make test`: one of each family/kind; the other depths are `make test-all` (exhaustive)
TRAIN_REPRESENTATIVE = (
    "resnet20",
    "vgg11",
    "alexnet",
    "resnet18_cifar",
    "efficientnet_lite0",
    "googlenet_cifar",
)


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=() if a in TRAIN_REPRESENTATIVE else pytest.mark.exhaustive)
        for a in ARCHS
    ],
)
def test_every_arch_trains_resumes_and_evaluates(
    arch: str, tmp_path: Path, cifar: Path, hymenoptera: Path
) -> None:
    imagenet = ARCHS[arch].family == "imagenet"
    base = dict(
        model_name=f"t_{arch}",
        data=str(hymenoptera if imagenet else cifar),
        arch=arch,
        pretrained="none",
        epochs=1,
        batch_size=8,
        lr=0.01,
        train_subset=16 if imagenet else 64,
        val_subset=16 if imagenet else 64,
        workers=0,
        out=str(tmp_path / arch),
        optimizer="sgd",
        schedule="cosine",
        width=0.25 if arch == "googlenet_cifar" else None,  # wiring, not accuracy
    )
    summary = Run(TrainConfig(**base)).fit()
    assert summary["epochs"] == 1
    resumed = Run(
        TrainConfig(**{**base, "epochs": 2, "resume": str(tmp_path / arch / "last.pt")})
    ).fit()
    ckpt = load_checkpoint(tmp_path / arch / "last.pt")
    assert ckpt.epoch == 2 and len(ckpt.history) == 2
    assert ckpt.card.arch_options == arch_options(arch, width=base["width"])
    assert resumed["best_val_acc"] == ckpt.card.metrics.best_val_acc
    best = load_checkpoint(tmp_path / arch / "checkpoint.pt")
    n = base["val_subset"]
    result = evaluate_checkpoint(
        tmp_path / arch / "checkpoint.pt", workers=0, verbose=False, limit=n
    )  # the same fixed subset the run validated on
    assert result["images"] == n
    assert result["top1"] == pytest.approx(best.card.metrics.best_val_acc, abs=1e-12)
    assert best.card.preprocessing.crop == ARCHS[arch].crop
    assert (tmp_path / arch / "confusion.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.long
def test_resume_continues_exactly(tmp_path: Path, cifar: Path) -> None:
    args = [
        "--recipe",
        "cifar10_resnet20",
        "--train-subset",
        "256",
        "--val-subset",
        "128",
        "--batch-size",
        "64",
        "--workers",
        "2",
        # absolute milestones: the recipe's fractions are of the run's length, which the
        # 1-epoch run below sets differently (its restored scheduler keeps them)
        "--milestones",
        "100",
        "150",
    ]
    run_cli("train", *args, "--epochs", "3", "--out", str(tmp_path / "straight"))
    run_cli("train", *args, "--epochs", "1", "--out", str(tmp_path / "split"))
    proc = run_cli("train", "--resume", str(tmp_path / "split" / "last.pt"), "--epochs", "3")
    assert "resumed from" in proc.stderr
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in lines]

    assert rows("straight") == rows("split")


def test_resume_refuses_a_checkpoint_of_another_arch(tmp_path: Path, cifar: Path) -> None:
    run_cli(
        "train",
        "--recipe",
        "cifar10_resnet20",
        "--train-subset",
        "64",
        "--val-subset",
        "64",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r20"),
    )
    proc = run_cli(
        "train", "--resume", str(tmp_path / "r20" / "last.pt"), "--arch", "vgg11", check=False
    )
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "vgg11" in proc.stderr


@pytest.mark.long
def test_ddp_two_processes_match_one_process(tmp_path: Path, cifar: Path) -> None:
    """torchrun, 2 CPU processes (gloo), global batch 32 = 2 x 16, vs 1 process, batch 32.
    BatchNorm off and augmentation off so both see exactly the same arithmetic."""
    args = [
        "--recipe",
        "cifar10_resnet20",
        "--no-batchnorm",
        "--augment",
        "none",
        "--train-subset",
        "256",
        "--val-subset",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--lr",
        "0.01",
        "--threads",
        "1",
    ]
    run_cli("train", *args, "--out", str(tmp_path / "one"))
    # --standalone: a local rendezvous on a free port.
    proc = subprocess.run(
        [
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "train",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    for key, value in one.state_dict.items():
        torch.testing.assert_close(two.state_dict[key], value, atol=1e-5, rtol=1e-4)
    changed = any(
        not torch.equal(v, build_model("resnet20", 10, batchnorm=False).state_dict()[k])
        for k, v in one.state_dict.items()
    )
    assert changed


def test_amp_bf16_and_tensorboard(tmp_path: Path, cifar: Path) -> None:
    run_cli(
        "train",
        "--recipe",
        "cifar10_resnet20",
        "--train-subset",
        "64",
        "--val-subset",
        "64",
        "--epochs",
        "1",
        "--amp",
        "bf16",
        "--channels-last",
        "--tensorboard",
        "--out",
        str(tmp_path),
    )
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[0]["train_loss"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["amp"] == "bf16" and saved["recipe"] == "cifar10_resnet20"
