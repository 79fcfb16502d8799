"""Command line: ``python -m train [train] | evaluate | data | bench | modules | cv | recipe``."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from serve.backend.errors import UsageError
from serve.core import hints
from serve.core.cli_common import Command
from serve.core.cli_common import main as cli_main
from serve.core.flags import Flag, add_flags
from train.config import (
    DEFAULT_RECIPE,
    TrainConfig,
    default_data,
    parse_sets,
)

log = logging.getLogger(__name__)

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


def F(field: str, option: str, help: str = "", **settings: Any) -> Flag:  # noqa: A002, N802
    """A training flag: ``option`` sets TrainConfig's ``field`` (its type and choices)."""
    return Flag(field, option, help, settings)


RUN_FLAGS = [
    F("resume", "--resume", "continue runs/X/last.pt exactly (its config is the base)"),
    F(
        "overwrite",
        "--overwrite",
        "start afresh in an OUT that already holds checkpoints (default: refuse)",
        action="store_true",
    ),
]
WHERE_FLAGS = [
    F("model_name", "--model", "run/served model name"),
    F("data", "--data", "ImageFolder root, .npz file or folder, or CIFAR root"),
    F("dataset", "--dataset", "how --data is read (auto: recognised from the path)"),
    F("download", "--download", "download torchvision CIFAR when missing (needs internet)"),
    F("out", "--out", "output folder (default runs/<model>)"),
]
MODEL_FLAGS = [
    F(
        "arch",
        "--arch",
        "see docs/training.md: resnet18, efficientnet_lite0, resnet20/32/44/56/"
        "110, resnet18_cifar, vgg11, vgg16, alexnet, googlenet, googlenet_cifar",
    ),
    F("batchnorm", "--batchnorm", "BatchNorm on/off (CIFAR archs)"),
    F(
        "dropout",
        "--dropout",
        "classifier dropout of vgg11/16, alexnet, googlenet_cifar (unset: the arch's)",
    ),
    F(
        "inception",
        "--inception",
        "googlenet_cifar: Inception modules with 1x1 reductions (default) or naive",
    ),
    F(
        "aux_weight",
        "--aux-weight",
        "googlenet_cifar: train the auxiliary classifiers, their losses weighted by this "
        "(the paper: 0.3; default 0: none); dropped at export",
    ),
    F("width", "--width", "googlenet_cifar: channel multiplier (default 1, the paper's widths)"),
    F(
        "mode",
        "--mode",
        "finetune: train the whole network; feature-extract: frozen backbone, head only",
    ),
    F("pretrained", "--pretrained", "auto | imagenet | none | a weights file"),
]
PREPROCESSING_FLAGS = [
    F(
        "resize",
        "--resize",
        "shorter side resized to this (px) before the crop: eval, pad-crop training",
    ),
    F("crop", "--crop", "input size (px): the eval center crop, the training random crop"),
    F("mean", "--mean", "normalization mean per RGB channel (pixels in 0..1)", nargs=3),
    F("std", "--std", "normalization std per RGB channel (pixels in 0..1)", nargs=3),
    F(
        "augment",
        "--augment",
        "training crops: random-resized-crop + flip (ImageNet); pad-crop: resize, padded "
        "random crop + flip (CIFAR); none: the eval transform",
    ),
]
OPTIMISATION_FLAGS = [
    F("epochs", "--epochs", "training epochs"),
    F("batch_size", "--batch-size", "global batch (split over processes)"),
    F("optimizer", "--optimizer", "sgd (--momentum, --nesterov) or adam/adamw (--betas)"),
    F("lr", "--lr", "base learning rate (warmup ramps up to it, the schedule decays it)"),
    F("momentum", "--momentum", "SGD momentum"),
    F("nesterov", "--nesterov", "SGD with Nesterov momentum"),
    F("weight_decay", "--weight-decay", "weight decay (L2 for sgd/adam, decoupled for adamw)"),
    F("betas", "--betas", "adam/adamw beta1 beta2", nargs=2),
    F("schedule", "--schedule", "lr schedule after warmup, stepped once per epoch"),
    F("step_size", "--step-size", "step schedule: epochs per decay, or a fraction of --epochs"),
    F("milestones", "--milestones", "multistep: epochs to decay at, or fractions of --epochs"),
    F("gamma", "--gamma", "decay factor (step/multistep/exponential)"),
    F("decay", "--decay", "inverse-time: lr / (1 + decay * epoch)"),
    F("min_lr", "--min-lr", "cosine floor"),
    F("warmup_epochs", "--warmup-epochs", "epochs of linear lr warmup (0: none)"),
    F("warmup_start", "--warmup-start", "warmup starts at lr * this"),
    F("label_smoothing", "--label-smoothing", "label smoothing of the training loss, in [0, 1)"),
    F(
        "cache_features",
        "--cache-features",
        "feature-extract: train the head on cached backbone features",
    ),
    F("feature_views", "--feature-views", "augmented views cached per image"),
]
HARDWARE_FLAGS = [
    F("device", "--device", "auto: CUDA when available, else CPU"),
    F("amp", "--amp", "autocast dtype"),
    F("channels_last", "--channels-last", "NHWC memory format for the model and its batches"),
    F("sync_bn", "--sync-bn", "torchrun on GPUs: BatchNorm statistics over the global batch"),
    F("workers", "--workers", "DataLoader workers"),
    F("threads", "--threads", "torch threads (0: default)"),
    F("seed", "--seed", "seed of init, data order, augmentation and --train-subset (+ the rank)"),
    F(
        "deterministic",
        "--deterministic",
        "deterministic torch kernels (warns where there is none; no cuDNN autotune)",
    ),
    F("train_subset", "--train-subset", "use N random training images"),
    F("val_subset", "--val-subset", "use N random val images"),
    F("max_train_batches", "--max-train-batches", "limit per epoch (smoke runs)"),
    F("max_val_batches", "--max-val-batches", "limit per epoch (smoke runs)"),
    F("download_timeout", "--download-timeout", "seconds to wait on a pretrained weights download"),
    F("tensorboard", "--tensorboard", "also log to <out>/tensorboard"),
]
GROUPS = {
    "what and where": WHERE_FLAGS,
    "model": MODEL_FLAGS,
    "preprocessing (default: the arch's / the weights')": PREPROCESSING_FLAGS,
    "optimisation": OPTIMISATION_FLAGS,
    "hardware and runs": HARDWARE_FLAGS,
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Flags override the recipe only when given (layered: a flag not given is absent),
    each bound to its TrainConfig field (serve.core.flags)."""
    p.argument_default = argparse.SUPPRESS
    p.formatter_class = argparse.HelpFormatter
    p.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"recipe name in train/recipes/ or a .yaml path (default {DEFAULT_RECIPE})",
    )
    p.add_argument(
        "--set",
        dest="_set",
        action="append",
        metavar="KEY=VALUE",
        help="any config field, value parsed as YAML (e.g. --set ema_decay=0.99); repeatable",
    )
    add_flags(p, TrainConfig, RUN_FLAGS, layered=True)
    for title, flags in GROUPS.items():
        add_flags(p.add_argument_group(title), TrainConfig, flags, layered=True)


def config_from_args(args: argparse.Namespace | list[str]) -> TrainConfig:
    """Defaults <- recipe (or the resumed checkpoint's config) <- flags given."""
    from train.config import resolve_config

    if isinstance(args, list):
        p = argparse.ArgumentParser(prog="python -m train train")
        add_train_arguments(p)
        args = p.parse_args(args)
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    values.update(parse_sets(getattr(args, "_set", None) or []))
    values.pop("command", None)
    recipe = values.pop("recipe", DEFAULT_RECIPE)
    if values.get("resume"):
        from train.models.checkpoint import load_checkpoint

        known = {f.name for f in fields(TrainConfig)}
        base = {k: v for k, v in load_checkpoint(values["resume"]).config.items() if k in known}
        return TrainConfig.from_dict({**base, "overwrite": False, **values})
    cfg = resolve_config(recipe, values)
    if not cfg.data:
        cfg.data = default_data()
    if not cfg.out:
        cfg.out = f"runs/{cfg.model_name}"
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from train.run.trainer import Run

    cfg = config_from_args(args)
    try:
        Run(cfg).fit()
    except KeyboardInterrupt:
        last = Path(cfg.out) / "last.pt"
        if last.is_file():
            log.error("interrupted; to go on from the last finished epoch: %s", resume_hint(last))
        else:
            log.error("interrupted before the first epoch ended: nothing saved to resume")
        raise
    return 0


def resume_hint(last: Path) -> str:
    """The command that resumes from ``last`` (in the form the user typed)."""
    if hints.via_make():
        return hints.flag(f"--resume {last}")
    return f"python -m train --resume {last}"


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="runs/<model>/checkpoint.pt")
    src.add_argument("--weights", help="a state dict file (needs --arch), e.g. resnet20-*.th")
    p.add_argument("--arch", help="architecture of --weights")
    p.add_argument(
        "--data",
        default=None,
        help="ImageFolder root, .npz file/folder or CIFAR root (default: the "
        "checkpoint's training data)",
    )
    p.add_argument(
        "--dataset",
        default="auto",
        help="auto (recognised from --data), imagefolder, npz, cifar10 or cifar100",
    )
    p.add_argument("--split", default="val", help="split to evaluate: train or val")
    p.add_argument(
        "--mean",
        type=float,
        nargs=3,
        help="normalization of --weights (default: known for published weights, else required)",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs=3,
        help="normalization of --weights (default: known for published weights, else required)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--confusion", help="also save the confusion matrix PNG here")
    p.add_argument(
        "--limit",
        type=int,
        default=0,
        help="evaluate a fixed random subset of N images (as --val-subset N)",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from train.run.evaluate import evaluate_checkpoint, evaluate_weights

    common = {
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "confusion_png": args.confusion,
        "limit": args.limit,
    }
    if args.checkpoint:
        evaluate_checkpoint(args.checkpoint, args.data, args.split, **common)
        return 0
    if not args.arch or not args.data:
        raise UsageError("--weights needs --arch and --data")
    evaluate_weights(
        args.weights, args.arch, args.data, args.split, mean=args.mean, std=args.std, **common
    )
    return 0


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="data", help="folder to unpack into")
    p.add_argument(
        "--dataset",
        choices=("hymenoptera", "cifar10", "cifar100"),
        default="hymenoptera",
        help="what to download (into ROOT/hymenoptera_data, ROOT/cifar10, ROOT/cifar100)",
    )


def run_data(args: argparse.Namespace) -> int:
    if args.dataset != "hymenoptera":
        from torchvision import datasets

        cls = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.CIFAR100
        target = Path(args.root) / args.dataset
        for train in (True, False):
            cls(str(target), train=train, download=True)
        log.info("%s in %s (use --data %s)", args.dataset, target, target)
        return 0
    target = Path(args.root) / "hymenoptera_data"
    if (target / "train").is_dir() and (target / "val").is_dir():
        log.info("%s already present", target)
        return 0
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(HYMENOPTERA_URL, download_root=args.root)
    log.info("unpacked into %s", target)
    return 0


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="recipe name or .yaml path")
    p.add_argument("--get", metavar="KEY", help="print one resolved setting (e.g. model_name)")


def run_recipe(args: argparse.Namespace) -> int:
    """Print a recipe resolved over the defaults (YAML), or one of its settings."""
    import yaml

    from train.config import resolve_config

    values = resolve_config(args.recipe).to_dict()
    if args.get:
        if args.get not in values:
            raise UsageError(f"no setting {args.get!r}; known: {', '.join(values)}")
        print(values[args.get])
    else:
        print(yaml.safe_dump(values, sort_keys=False), end="")
    return 0


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from train.tools.time_to_accuracy import add_arguments

    add_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    from train.tools.time_to_accuracy import run

    return run(args)


def add_modules_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m train modules`` (here: its module imports torch)."""
    p.add_argument(
        "--out",
        default="bench/local",
        help="report folder (modules-<date>.json, modules-latest.json and .png)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument(
        "--module-batch", type=int, default=32, help="batch of the single-module measurements"
    )
    p.add_argument("--net-batch", type=int, default=16, help="batch of the reduced network")
    p.add_argument(
        "--naive-net-batch", type=int, default=4, help="batch of the naive network (~10x FLOPs)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")


def run_modules(args: argparse.Namespace) -> int:
    from train.tools.inception_modules import run

    return run(args)


def add_cv_arguments(p: argparse.ArgumentParser) -> None:
    from train.tools.kfold import add_arguments

    add_arguments(p)


def add_probe_cv_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m train probe-cv`` (here: its module imports torch)."""
    from train.config import default_data

    p.add_argument(
        "--data",
        default=default_data(),
        help="ImageFolder root: its training images are cross-validated (val only reported)",
    )
    p.add_argument("--folds", type=int, default=3, help="k of the stratified k-fold split")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of the folds and the head's training, each a full cross-validation",
    )
    p.add_argument("--out", default="bench/local", help="folder of probe-cv-latest.json and .png")


def run_cv(args: argparse.Namespace) -> int:
    from train.tools.kfold import run

    return run(args)


COMMANDS = [
    Command(
        "train",
        "train an image classifier (the default command)",
        add_train_arguments,
        run_train,
        description="Train an image classifier and write a self-describing checkpoint. "
        "Settings come from a YAML recipe (train/recipes/), then these flags. "
        "Multi-process: `torchrun --nproc_per_node N -m train ...`.",
    ),
    Command(
        "evaluate",
        "per-class and overall top-1 of a checkpoint or published weights",
        add_evaluate_arguments,
        run_evaluate,
        description="Evaluate a checkpoint, or raw weights of a known arch, on a dataset "
        "split: per-class top-1, then a last line 'top-1: NN.NN%%'.",
    ),
    Command(
        "data",
        "download ants/bees or CIFAR-10/100 (online)",
        add_data_arguments,
        run_data,
        description=f"Download the ants/bees dataset ({HYMENOPTERA_URL}) or CIFAR-10/100 "
        "(torchvision) when online.",
    ),
    Command(
        "bench",
        "time-to-accuracy of the ants/bees recipes and CIFAR training speed",
        add_bench_arguments,
        run_bench,
    ),
    Command(
        "modules",
        "naive vs 1x1-reduced Inception modules and GoogLeNet: params, FLOPs, images/s",
        add_modules_arguments,
        run_modules,
    ),
    Command(
        "cv",
        "k-fold cross-validation of recipe settings on the training images",
        add_cv_arguments,
        run_cv,
    ),
    Command("recipe", "print a resolved recipe or one setting", add_recipe_arguments, run_recipe),
    Command(
        "probe-cv",
        "cross-validate the linear probe's head init and learning rate on cached features",
        add_probe_cv_arguments,
        lambda a: _probe_cv().run(a),
        description="How the default recipe's head_init and lp_lr were chosen: the "
        "offline backbone's features once, then k-fold CV of each candidate on the "
        "training images (bench/local/probe-cv-latest.json and .png).",
    ),
]


def _probe_cv():  # noqa: ANN202 - the module, imported only when the command is used
    from train.tools import probe_cv

    return probe_cv


def main(argv: list[str] | None = None) -> int:
    """``python -m train [train|evaluate|data|bench|modules|cv|recipe] ...`` (default train)."""
    return cli_main(
        "python -m train",
        "Train, evaluate and benchmark image classifiers (`python -m train COMMAND -h`).",
        COMMANDS,
        argv,
        default="train",
    )
