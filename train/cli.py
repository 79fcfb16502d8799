"""Command line: ``python -m train`` (train), ``... evaluate`` and ``... data``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from train.config import AMP, DEFAULT_RECIPE, MODES, OPTIMIZERS, SCHEDULES, TrainConfig

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/hymenoptera_data"
LOCAL_DATA = Path("data/hymenoptera_data")
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


def default_data() -> str:
    """``../shared/data/hymenoptera_data`` when present, else ``data/hymenoptera_data``."""
    return str(SHARED_DATA if SHARED_DATA.is_dir() else LOCAL_DATA)


def train_parser() -> argparse.ArgumentParser:
    """Flags override the recipe only when given (their defaults are the recipe's)."""
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(
        prog="python -m train",
        argument_default=S,
        description="Train an image classifier and write a self-describing checkpoint. "
        "Settings come from a YAML recipe (train/recipes/), then these flags. Other "
        "commands: `python -m train evaluate -h`, `python -m train data -h`. Multi-process: "
        "`torchrun --nproc_per_node N -m train ...`.",
    )
    p.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"recipe name in train/recipes/ or a .yaml path (default {DEFAULT_RECIPE})",
    )
    p.add_argument("--resume", help="continue runs/X/last.pt exactly (its config is the base)")
    g = p.add_argument_group("what and where")
    g.add_argument("--model", dest="model_name", help="run/served model name")
    g.add_argument("--data", help="ImageFolder root, .npz file or folder, or CIFAR root")
    g.add_argument("--dataset", choices=("auto", "imagefolder", "npz", "cifar10", "cifar100"))
    g.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        help="download torchvision CIFAR when missing (needs internet)",
    )
    g.add_argument("--out", help="output folder (default runs/<model>)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        help="see README: resnet18, efficientnet_lite0, resnet20/32/44/56/"
        "110, resnet18_cifar, vgg11, vgg16, alexnet",
    )
    g.add_argument(
        "--batchnorm", action=argparse.BooleanOptionalAction, help="BatchNorm on/off (CIFAR archs)"
    )
    g.add_argument("--dropout", type=float)
    g.add_argument("--mode", choices=MODES)
    g.add_argument("--pretrained", help="auto | imagenet | none | a weights file")
    g = p.add_argument_group("preprocessing (default: the arch's / the weights')")
    g.add_argument("--resize", type=int)
    g.add_argument("--crop", type=int)
    g.add_argument("--mean", type=float, nargs=3)
    g.add_argument("--std", type=float, nargs=3)
    g.add_argument("--augment", choices=("random-resized-crop", "pad-crop", "none"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch (split over processes)")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--betas", type=float, nargs=2)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--step-size", type=int, help="step schedule: epochs per decay")
    g.add_argument("--milestones", type=int, nargs="+", help="multistep schedule epochs")
    g.add_argument("--gamma", type=float, help="decay factor (step/multistep/exponential)")
    g.add_argument("--decay", type=float, help="inverse-time: lr / (1 + decay * epoch)")
    g.add_argument("--min-lr", type=float, help="cosine floor")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--warmup-start", type=float, help="warmup starts at lr * this")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        help="feature-extract: train the head on cached backbone features",
    )
    g.add_argument("--feature-views", type=int, help="augmented views cached per image")
    g = p.add_argument_group("hardware and runs")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--amp", choices=AMP, help="autocast dtype")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    g.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        help="torchrun on GPUs: BatchNorm statistics over the global batch",
    )
    g.add_argument("--workers", type=int, help="DataLoader workers")
    g.add_argument("--threads", type=int, help="torch threads (0: default)")
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction)
    g.add_argument("--train-subset", type=int, help="use N random training images")
    g.add_argument("--val-subset", type=int, help="use N random val images")
    g.add_argument("--max-train-batches", type=int, help="limit per epoch (smoke runs)")
    g.add_argument("--max-val-batches", type=int, help="limit per epoch (smoke runs)")
    g.add_argument("--download-timeout", type=float)
    g.add_argument(
        "--tensorboard", action=argparse.BooleanOptionalAction, help="also log to <out>/tensorboard"
    )
    return p


def config_from_args(argv: list[str]) -> TrainConfig:
    """Defaults <- recipe (or the resumed checkpoint's config) <- flags given."""
    from train.config import resolve_config

    args: dict[str, Any] = vars(train_parser().parse_args(argv))
    recipe = args.pop("recipe", DEFAULT_RECIPE)
    if args.get("resume"):
        from train.checkpoint import load_checkpoint

        known = {f.name for f in fields(TrainConfig)}
        base = {k: v for k, v in load_checkpoint(args["resume"])["config"].items() if k in known}
        cfg = TrainConfig.from_dict({**base, **args})
        cfg.validate()
        return cfg
    cfg = resolve_config(recipe, args)
    if not cfg.data:
        cfg.data = default_data()
    if not cfg.out:
        cfg.out = f"runs/{cfg.model_name}"
    return cfg


def run_train(argv: list[str]) -> int:
    from train.trainer import Run

    Run(config_from_args(argv)).fit()
    return 0


def run_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train evaluate",
        description="Evaluate a checkpoint, or raw weights of a known arch, on a dataset "
        "split: per-class top-1, then a last line 'top-1: NN.NN%%'.",
    )
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
    p.add_argument("--dataset", default="auto")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--mean",
        type=float,
        nargs=3,
        help="normalization of --weights (default: known for published weights, else required)",
    )
    p.add_argument("--std", type=float, nargs=3)
    p.add_argument("--classes", help="class-name file for --weights (default: the data's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--confusion", help="also save the confusion matrix PNG here")
    p.add_argument(
        "--limit",
        type=int,
        default=0,
        help="evaluate a fixed random subset of N images (as --val-subset N)",
    )
    args = p.parse_args(argv)
    from train.evaluate import evaluate_checkpoint, evaluate_weights

    if args.checkpoint:
        evaluate_checkpoint(
            args.checkpoint,
            args.data,
            args.split,
            dataset=args.dataset,
            batch_size=args.batch_size,
            workers=args.workers,
            confusion_png=args.confusion,
            limit=args.limit,
        )
    else:
        if not args.arch or not args.data:
            p.error("--weights needs --arch and --data")
        evaluate_weights(
            args.weights,
            args.arch,
            args.data,
            args.split,
            dataset=args.dataset,
            mean=args.mean,
            std=args.std,
            batch_size=args.batch_size,
            workers=args.workers,
            confusion_png=args.confusion,
            limit=args.limit,
        )
    return 0


def run_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train data",
        description=f"Download the ants/bees dataset ({HYMENOPTERA_URL}) or CIFAR-10/100 "
        "(torchvision) when online.",
    )
    p.add_argument("--root", default="data", help="folder to unpack into")
    p.add_argument(
        "--dataset", choices=("hymenoptera", "cifar10", "cifar100"), default="hymenoptera"
    )
    args = p.parse_args(argv)
    if args.dataset != "hymenoptera":
        from torchvision import datasets

        cls = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.CIFAR100
        target = Path(args.root) / args.dataset
        for train in (True, False):
            cls(str(target), train=train, download=True)
        print(f"{args.dataset} in {target} (use --data {target})")
        return 0
    target = Path(args.root) / "hymenoptera_data"
    if (target / "train").is_dir() and (target / "val").is_dir():
        print(f"{target} already present")
        return 0
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(HYMENOPTERA_URL, download_root=args.root)
    print(f"unpacked into {target}")
    return 0


def run_bench(argv: list[str]) -> int:
    from train.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {"evaluate": run_evaluate, "data": run_data, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``python -m train [evaluate|data] ...``; errors print one clear line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else run_train(argv)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
