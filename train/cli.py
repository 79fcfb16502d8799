"""Command line: ``python -m train`` (train), ``... evaluate`` and ``... data``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config import MODES, TrainConfig

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/hymenoptera_data"
LOCAL_DATA = Path("data/hymenoptera_data")
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


def default_data() -> str:
    """``../shared/data/hymenoptera_data`` when present, else ``data/hymenoptera_data``."""
    return str(SHARED_DATA if SHARED_DATA.is_dir() else LOCAL_DATA)


def train_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune an image classifier on an ImageFolder (train/ and val/) and "
        "write a self-describing checkpoint. Other commands: `python -m train evaluate -h`, "
        "`python -m train data -h`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        dest="model_name",
        default=d.model_name,
        help="model name: output folder runs/<model> and the served model's name",
    )
    p.add_argument("--data", default=None, help=f"ImageFolder root (default: {default_data()})")
    p.add_argument("--out", default=None, help="output folder (default: runs/<model>)")
    p.add_argument("--arch", default=d.arch, help="resnet18 | efficientnet_lite0")
    p.add_argument(
        "--mode",
        default=d.mode,
        choices=MODES,
        help="finetune: all layers train; feature-extract: frozen backbone, new head",
    )
    p.add_argument(
        "--pretrained", default=d.pretrained, help="auto | imagenet | none | path to a weights file"
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--step-size", type=int, default=d.step_size, help="StepLR step (epochs)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="StepLR factor")
    p.add_argument("--resize", type=int, default=d.resize, help="eval Resize (shorter side)")
    p.add_argument("--crop", type=int, default=d.crop, help="crop size = model input size")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: default)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-train-batches", type=int, default=0, help="limit per epoch (smoke runs)")
    p.add_argument("--max-val-batches", type=int, default=0, help="limit per epoch (smoke runs)")
    p.add_argument(
        "--download-timeout",
        type=float,
        default=d.download_timeout,
        help="seconds before a weights download is given up",
    )
    return p


def run_train(argv: list[str]) -> int:
    from train.trainer import Run

    args = vars(train_parser().parse_args(argv))
    args["data"] = args["data"] or default_data()
    args["out"] = args["out"] or f"runs/{args['model_name']}"
    Run(TrainConfig(**args)).fit()
    return 0


def run_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train evaluate",
        description="Evaluate a checkpoint on an ImageFolder split: per-class top-1, then "
        "a last line 'top-1: NN.NN%'.",
    )
    p.add_argument("--checkpoint", required=True, help="runs/<model>/checkpoint.pt")
    p.add_argument("--data", default=None, help=f"ImageFolder root (default: {default_data()})")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    from train.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint,
        args.data or default_data(),
        args.split,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    return 0


def run_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train data",
        description=f"Download and unpack the ants/bees dataset from {HYMENOPTERA_URL}.",
    )
    p.add_argument("--root", default="data", help="folder to unpack into")
    args = p.parse_args(argv)
    target = Path(args.root) / "hymenoptera_data"
    if (target / "train").is_dir() and (target / "val").is_dir():
        print(f"{target} already present")
        return 0
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(HYMENOPTERA_URL, download_root=args.root)
    print(f"unpacked into {target}")
    return 0


COMMANDS = {"evaluate": run_evaluate, "data": run_data}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``python -m train [evaluate|data] ...``; errors print one clear line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else run_train(argv)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
