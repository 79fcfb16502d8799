"""Recipes and configs: every recipe is valid, He et al.'s recipe is exact, errors name the
problem, make passes only the variables that are set, schedules warm up."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT
from train.cli import config_from_args
from train.config import RECIPES_DIR, TrainConfig, load_recipe
from train.models import arch_options
from train.optim import build_optimizer, build_scheduler


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
    ) == ("sgd", 0.1, 0.9, 0.0001, 128, 200, "multistep", [100, 150], 0.1)
    default = config_from_args([])
    assert (default.recipe, default.model_name, default.mode, default.epochs) == (
        "antsbees_finetune",
        "antsbees",
        "finetune",
        25,
    )
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
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
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
