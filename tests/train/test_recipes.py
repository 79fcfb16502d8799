"""Recipes and configs: every recipe is valid, He et al.'s and the PyTorch tutorial's recipes
are exact, errors name the problem, make passes only the variables that are set, schedules
warm up; the fine-tune extras (LP-FT, top blocks, frozen BN, EMA, TrivialAugment) run end to
end on real images and weights; cross-validation folds partition the training images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision import transforms as T

from tests.helpers import ROOT
from train.cli import config_from_args
from train.config import RECIPES_DIR, TrainConfig, load_recipe, resolve_config
from train.data.datasets import is_image_file
from train.data.preprocess import Preprocess
from train.models.archs import arch_options, build_model
from train.models.checkpoint import load_checkpoint
from train.models.finetune import block_names, init_head_from_imagenet
from train.models.pretrained import efficientnet_lite0_state_dict
from train.run.optim import build_optimizer, build_scheduler
from train.run.trainer import Run
from train.tools.kfold import Candidate, materialize_fold, stratified_folds


def _lr_per_epoch(cfg: TrainConfig) -> list[float]:
    """The learning rate of each epoch of ``cfg``'s schedule (optimizer and scheduler as
    the trainer builds them)."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_recipes_are_valid_and_he_et_al_is_exact() -> None:
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"antsbees_finetune", "antsbees_feature_extract", "cifar10_resnet20"} <= set(names)
    for name in names:
        TrainConfig.from_dict(load_recipe(name)).validate()
    he = load_recipe("cifar10_resnet20")
    assert (
        he["optimizer"],
        he["lr"],
        he["momentum"],
        he["weight_decay"],
        he["batch_size"],
        he["epochs"],
        he["schedule"],
        he["milestones"],
        he["gamma"],
    ) == ("sgd", 0.1, 0.9, 0.0001, 128, 200, "multistep", [0.5, 0.75], 0.1)
    default = config_from_args([])
    assert (default.recipe, default.model_name, default.mode) == (
        "antsbees_probe",
        "antsbees",
        "finetune",
    )
    assert default.lp_epochs > 0 and default.epochs == 0  # LP-FT's linear probe alone
    lpft = config_from_args(["--recipe", "antsbees_finetune"])
    assert lpft.lp_epochs > 0 and lpft.epochs > 0 and lpft.ema_decay > 0  # LP-FT with EMA
    # the probe is LP-FT's first stage exactly: every setting it reads is the same
    for key in (
        "head_init",
        "feature_views",
        "lp_epochs",
        "lp_lr",
        "lp_batch_size",
        "label_smoothing",
        "rrc_scale",
        "channels_last",
        "batch_size",
        "arch",
    ):
        assert getattr(default, key) == getattr(lpft, key), key
    cfg = config_from_args(["--recipe", "cifar10_resnet20", "--epochs", "3", "--no-batchnorm"])
    assert (cfg.epochs, cfg.lr, cfg.batchnorm, cfg.out) == (3, 0.1, False, "runs/cifar10_resnet20")


def test_recipe_and_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar10_resnet20"):
        config_from_args(["--recipe", "no_such_recipe"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: resnet20\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config keys: learning_rate"):
        config_from_args(["--recipe", str(bad)])
    with pytest.raises(ValueError, match="no BatchNorm switch"):
        arch_options("resnet18", batchnorm=False)


def test_make_train_passes_only_variables_that_are_set() -> None:
    out = subprocess.run(
        ["make", "-n", "train", "RECIPE=cifar10_resnet20", "EPOCHS=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--recipe cifar10_resnet20 --model cifar10_resnet20" in out
    assert "--epochs 3" in out and "--arch" not in out and "--data" not in out


@pytest.mark.parametrize(
    "schedule", ["step", "multistep", "exponential", "cosine", "inverse-time", "constant"]
)
def test_schedules_with_warmup(schedule: str) -> None:
    cfg = TrainConfig(
        epochs=10,
        lr=0.1,
        schedule=schedule,
        step_size=4,
        milestones=[5, 8],
        gamma=0.5,
        decay=1.0,
        warmup_epochs=2,
        warmup_start=0.1,
    )
    lrs = _lr_per_epoch(cfg)
    assert lrs[0] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.1)  # linear warmup
    expected_after = {
        "step": [0.1] * 4 + [0.05] * 4,
        "multistep": [0.1] * 3 + [0.05] * 3 + [0.025] * 2,
        "exponential": [0.1 * 0.5**i for i in range(8)],
        "constant": [0.1] * 8,
        "inverse-time": [0.1 / (1 + i) for i in range(8)],
    }
    if schedule in expected_after:
        assert lrs[2:] == pytest.approx(expected_after[schedule])
    else:  # cosine: monotone down from 0.1
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 0.01


@pytest.mark.parametrize(
    ("recipe", "epochs", "decays"),
    [
        ("cifar10_resnet20", 200, [100, 150]),  # He et al.'s epochs
        ("cifar10_resnet20", 20, [10, 15]),  # EPOCHS=20 keeps the schedule's shape
        ("cifar10_vgg16", 30, [3, 6, 9, 12, 15, 18, 21, 24, 27]),
        ("antsbees_tutorial", 5, [1, 2, 3, 4]),
    ],
)
def test_schedules_scale_with_epochs(recipe: str, epochs: int, decays: list[int]) -> None:
    """Milestones and step sizes are fractions of the run: `make train EPOCHS=N` lowers
    the learning rate at the same points of a shorter run."""
    cfg = config_from_args(["--recipe", recipe, "--epochs", str(epochs)])
    lrs = _lr_per_epoch(cfg)
    assert [e for e in range(1, epochs) if lrs[e] < lrs[e - 1] * 0.99] == decays


def test_schedule_points_are_epochs_or_fractions() -> None:
    with pytest.raises(ValueError, match="milestones must be whole epochs"):
        TrainConfig(schedule="multistep", milestones=[1.5]).validate()
    with pytest.raises(ValueError, match="step_size must be whole epochs"):
        TrainConfig(step_size=0).validate()
    assert TrainConfig(epochs=7, step_size=0.5).in_epochs(0.5) == 4


def test_tutorial_recipe_is_the_pytorch_tutorial() -> None:
    """Tutorial: SGD lr 0.001 momentum 0.9, StepLR(7, 0.1), 25 epochs, batch 4,
    RandomResizedCrop(224) + flip, every layer trains; none of the extras."""
    cfg = config_from_args(["--recipe", "antsbees_tutorial"])
    assert (cfg.model_name, cfg.mode, cfg.arch, cfg.pretrained) == (
        "antsbees",
        "finetune",
        "resnet18",
        "auto",
    )
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (
        "sgd",
        0.001,
        0.9,
        False,
        0.0,
    )
    assert (cfg.schedule, cfg.gamma, cfg.warmup_epochs) == ("step", 0.1, 0)
    assert cfg.in_epochs(cfg.step_size) == 7  # StepLR(7) at the tutorial's 25 epochs
    assert (cfg.epochs, cfg.batch_size, cfg.label_smoothing) == (25, 4, 0.0)
    assert (cfg.augment, cfg.rrc_scale, cfg.auto_augment) == (None, [0.08, 1.0], "none")
    assert (cfg.lp_epochs, cfg.train_blocks, cfg.frozen_bn, cfg.ema_decay) == (0, 0, False, 0.0)
    # The new fields' defaults keep every older recipe's behaviour (the tutorial transform).
    assert TrainConfig() == TrainConfig.from_dict({})
    steps = Preprocess().train_transform().transforms
    assert isinstance(steps[0], T.RandomResizedCrop) and steps[0].scale == (0.08, 1.0)
    assert [type(s) for s in steps[1:]] == [T.RandomHorizontalFlip, T.ToTensor, T.Normalize]


def test_new_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="auto_augment"):
        TrainConfig(auto_augment="autoaugment").validate()
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0).validate()
    with pytest.raises(ValueError, match="rrc_scale"):
        TrainConfig(rrc_scale=[0.5, 0.2]).validate()
    with pytest.raises(ValueError, match="lp_epochs"):
        TrainConfig(lp_epochs=-1).validate()
    # epochs 0 means "the linear probe alone", so it needs one
    TrainConfig(mode="finetune", lp_epochs=5, epochs=0).validate()
    for bad in ({"mode": "finetune", "lp_epochs": 0}, {"mode": "feature-extract", "lp_epochs": 5}):
        with pytest.raises(ValueError, match="epochs must be >= 1"):
            TrainConfig(epochs=0, **bad).validate()
    cfg = config_from_args(["--set", "ema_decay=0.9", "--set", "rrc_scale=[0.3, 1.0]"])
    assert (cfg.ema_decay, cfg.rrc_scale) == (0.9, [0.3, 1.0])
    with pytest.raises(ValueError, match="unknown config keys: ema"):
        config_from_args(["--set", "ema=0.9"])
    pre = Preprocess(rrc_scale=(0.3, 1.0), auto_augment="trivialaugment")
    steps = pre.train_transform().transforms
    assert steps[0].scale == (0.3, 1.0) and isinstance(steps[2], T.TrivialAugmentWide)
    assert Preprocess.from_card(pre.card_preprocessing(), pre.augment_settings()) == pre


def test_head_init_copies_the_imagenet_rows_of_the_classes() -> None:
    model = build_model("efficientnet_lite0", 2)
    init_head_from_imagenet(model, "efficientnet_lite0", [310, 309])
    imagenet, _ = efficientnet_lite0_state_dict(build_model("efficientnet_lite0", 1000))
    assert torch.equal(model.classifier.weight, imagenet["classifier.weight"][[310, 309]])
    assert torch.equal(model.classifier.bias, imagenet["classifier.bias"][[310, 309]])
    with pytest.raises(ValueError, match="needs 2 ImageNet class indices"):
        init_head_from_imagenet(model, "efficientnet_lite0", [310])
    with pytest.raises(ValueError, match="head_init needs ImageNet weights"):
        TrainConfig(head_init=[310, 309], pretrained="none").validate()
    # a flag that swaps the weights drops the recipe's ImageNet rows; an explicit one errors
    assert resolve_config("antsbees_finetune", {"pretrained": "none"}).head_init == []
    with pytest.raises(ValueError, match="head_init needs ImageNet weights"):
        resolve_config("antsbees_finetune", {"pretrained": "none", "head_init": [1, 2]})


def _small_lpft(hymenoptera: Path, tmp_path: Path, **overrides: Any) -> TrainConfig:
    """The default recipe, shrunk to seconds: 2 LP epochs on one cached view of 16 images
    (overrides win), output in ``tmp_path/run``."""
    return resolve_config(
        "antsbees_finetune",
        {
            "data": str(hymenoptera),
            "out": str(tmp_path / "run"),
            "lp_epochs": 2,
            "feature_views": 1,
            "train_subset": 16,
            "val_subset": 16,
            "workers": 0,
            **overrides,
        },
    )


@pytest.mark.slow
def test_lp_ft_top_blocks_frozen_bn_ema_end_to_end(tmp_path: Path, hymenoptera: Path) -> None:
    """LP on cached features, then 1 epoch of the top 2 blocks with frozen BN and EMA, on
    16 real images with the real offline ImageNet backbone."""
    cfg = _small_lpft(
        hymenoptera,
        tmp_path,
        arch="efficientnet_lite0",
        epochs=1,
        batch_size=4,
        train_blocks=2,
        frozen_bn=True,
        ema_decay=0.5,
        auto_augment="trivialaugment",
    )
    run = Run(cfg)
    summary = run.fit()
    assert summary["lp_val_acc"] is not None and 0 <= summary["lp_val_acc"] <= 1
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [0, 1]  # the linear probe is epoch 0
    assert rows[0]["val_acc"] == summary["lp_val_acc"]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")  # epoch 1 (the best may be 0)
    assert ckpt.epoch == 1
    imagenet, _ = efficientnet_lite0_state_dict(build_model("efficientnet_lite0", 1000))
    # Below the top 2 blocks nothing moved, BatchNorm statistics included.
    assert block_names(run.model)[-2:] == ["blocks.5", "blocks.6"]
    for key, value in ckpt.state_dict.items():
        if key.startswith(("conv_stem", "bn1", "blocks.0", "blocks.4")):
            assert torch.equal(value, imagenet[key]), f"frozen tensor {key} changed"
    # The top blocks trained; their BN statistics stayed (frozen_bn); the head is no
    # longer the random one (LP) and the saved weights are the EMA's, not the live model's.
    top = "blocks.6.0.conv_pwl.weight"
    assert not torch.equal(ckpt.state_dict[top], imagenet[top])
    assert torch.equal(ckpt.state_dict["bn2.running_mean"], imagenet["bn2.running_mean"])
    live = run.model.state_dict()
    assert torch.equal(ckpt.state_dict[top], run.ema.module.state_dict()[top].cpu())
    assert not torch.equal(ckpt.state_dict[top], live[top])
    assert ckpt.augment == {
        "augment": "random-resized-crop",
        "padding": 4,
        "rrc_scale": cfg.rrc_scale,
        "auto_augment": "trivialaugment",
    }


@pytest.mark.slow
def test_linear_probe_alone_with_epochs_0(tmp_path: Path, hymenoptera: Path) -> None:
    """``epochs: 0`` in an LP-FT recipe trains the head on cached features and stops: the
    checkpoint is epoch 0's, the backbone is the ImageNet one, the head moved."""
    cfg = _small_lpft(hymenoptera, tmp_path, arch="efficientnet_lite0", epochs=0, lp_lr=0.01)
    summary = Run(cfg).fit()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [0] and summary["best_epoch"] == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    imagenet, _ = efficientnet_lite0_state_dict(build_model("efficientnet_lite0", 1000))
    for key, value in ckpt.state_dict.items():
        if not key.startswith("classifier."):
            assert torch.equal(value, imagenet[key]), f"backbone tensor {key} changed"
    assert not torch.equal(
        ckpt.state_dict["classifier.weight"], imagenet["classifier.weight"][[310, 309]]
    )


def _resnet18_weights() -> tuple[Path, str]:
    """The torchvision ResNet-18 ImageNet file in the hub cache, and why a test skips."""
    from torchvision.models import ResNet18_Weights

    name = Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    return cached, (
        f"the default recipe on ResNet-18 needs its ImageNet weights, absent offline: "
        f"place {name} in {cached.parent} (or set TORCH_HOME) to run it"
    )


@pytest.mark.slow
def test_default_recipe_on_resnet18_imagenet_weights(tmp_path: Path, hymenoptera: Path) -> None:
    """The card's model: the same LP-FT machinery on torchvision's ResNet-18 (head from the
    ImageNet ant/bee rows, top 3 of its 8 blocks fine-tuned, the rest frozen). Runs where
    the weights are in the torch hub cache; skips here with the reason."""
    cached, why = _resnet18_weights()
    if not cached.is_file():
        pytest.skip(why)
    cfg = _small_lpft(
        hymenoptera, tmp_path, pretrained="imagenet", epochs=1, train_subset=32, val_subset=32
    )
    assert cfg.arch == "resnet18" and cfg.head_init == [310, 309]
    run = Run(cfg)
    summary = run.fit()
    assert summary["arch"] == "resnet18" and "ResNet18_Weights" in summary["pretrained"]["source"]
    assert block_names(run.model)[-3:] == ["layer3.1", "layer4.0", "layer4.1"]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    imagenet = torch.load(cached, map_location="cpu", weights_only=True)
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer3.0.conv2.weight"):
        assert torch.equal(ckpt.state_dict[key], imagenet[key]), f"frozen {key} changed"
    assert not torch.equal(
        ckpt.state_dict["layer4.1.conv2.weight"], imagenet["layer4.1.conv2.weight"]
    )
    assert ckpt.card.arch == "resnet18" and ckpt.card.classes == ["ants", "bees"]


def test_cv_folds_partition_the_training_images(tmp_path: Path, hymenoptera: Path) -> None:
    folds = stratified_folds(hymenoptera, 3)
    train = sorted(p for p in (hymenoptera / "train").rglob("*") if is_image_file(p.name))
    held = sorted(f for fold in folds for files in fold.values() for f in files)
    assert held == train and len(set(held)) == len(held)  # each image held out exactly once
    for c in ("ants", "bees"):
        sizes = [len(f[c]) for f in folds]
        assert max(sizes) - min(sizes) <= 1  # stratified
    root = materialize_fold(folds, 1, tmp_path / "k3-1")

    def images(d: Path) -> list[Path]:
        return [p for p in d.rglob("*") if is_image_file(p.name)]

    val = sorted(p.name for p in images(root / "val"))
    assert val == sorted(f.name for files in folds[1].values() for f in files)
    assert not set(val) & {p.name for p in images(root / "train")}
    assert all(p.resolve().parent.parent == (hymenoptera / "train").resolve() for p in images(root))
    assert Candidate.parse("ta antsbees_finetune auto_augment=trivialaugment lr=0.01") == (
        Candidate("ta", "antsbees_finetune", {"auto_augment": "trivialaugment", "lr": 0.01})
    )


class _Interrupted(Run):
    """A run stopped as by Ctrl-C when fine-tune epoch ``stop_at`` starts."""

    stop_at = 0

    def _epoch_full(self, epoch: int) -> Any:
        if epoch == self.stop_at:
            raise KeyboardInterrupt
        return super()._epoch_full(epoch)


@pytest.mark.slow
def test_default_recipe_resumes_exactly(tmp_path: Path, hymenoptera: Path) -> None:
    """The default recipe (LP-FT, frozen BN, weight EMA, cosine over 2 epochs), shrunk:
    interrupted in fine-tune epoch 1 (last.pt is the probe's epoch 0) and resumed, then
    interrupted in epoch 2 and resumed, gives the uninterrupted run's weights and metrics
    bit for bit; the probe runs once and epoch 0 is recorded once."""
    small = {"arch": "efficientnet_lite0", "batch_size": 8}
    Run(_small_lpft(hymenoptera, tmp_path / "straight", **small)).fit()
    cfg = _small_lpft(hymenoptera, tmp_path / "split", **small)
    assert (cfg.epochs, cfg.lp_epochs > 0, cfg.ema_decay > 0) == (2, True, True)
    last = str(tmp_path / "split" / "run" / "last.pt")
    for stop_at, done in ((1, 0), (2, 1)):
        run = _Interrupted(cfg)
        run.stop_at = stop_at
        with pytest.raises(KeyboardInterrupt):
            run.fit()
        assert load_checkpoint(last).epoch == done
        cfg = config_from_args(["--resume", last])  # what `--resume runs/X/last.pt` does
    summary = Run(cfg).fit()
    a = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")
    b = load_checkpoint(last)
    assert a.epoch == b.epoch == 2
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in lines]

    assert [r["epoch"] for r in rows("split")] == [0, 1, 2]
    assert rows("straight") == rows("split")
    assert summary["lp_val_acc"] == rows("straight")[0]["val_acc"]


def test_run_titles_say_what_the_run_is(tmp_path) -> None:
    """curves.png's title: a CIFAR recipe trains from scratch (not "finetune"); LP-FT
    marks the probe (epoch 0) and fine-tuning as stages."""
    from train.run.plots import plot_curves
    from train.run.report import run_stages, run_title

    scratch = config_from_args(["--recipe", "cifar10_resnet20"])
    assert run_title(scratch, "resnet20") == "cifar10_resnet20: resnet20, from scratch"
    assert run_stages(scratch) == []
    assert "linear probe (frozen backbone)" in run_title(config_from_args([]), "resnet18")
    assert run_stages(config_from_args([])) == []  # the default: the probe alone
    lpft = config_from_args(["--recipe", "antsbees_finetune"])
    assert "linear probe + fine-tune" in run_title(lpft, "resnet18")
    assert run_stages(lpft) == [(0, "linear probe"), (1, "fine-tune")]
    row = {"train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5, "lr": 0.1}
    history = [{**row, "epoch": e, "val_acc": 0.5 + e / 10} for e in range(3)]
    plot_curves(history, tmp_path / "curves.png", "t", run_stages(lpft))
    assert (tmp_path / "curves.png").stat().st_size > 10_000
