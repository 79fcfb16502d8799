"""Command line: ``python -m export`` (checkpoint -> ONNX -> parity -> model repository)."""

from __future__ import annotations

import argparse
import sys

from export.release import ExportConfig, ParityFailed, run_export
from export.repository import ServingConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a checkpoint to ONNX (0..255 RGB pixels in, normalization inside, "
        "dynamic batch), compare PyTorch and ONNX Runtime on every val image, write "
        "parity.json, and publish the next numeric version into the model repository. "
        "Publishing is refused unless top-1 agreement is 100%% and max |diff| <= 1e-3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", default="runs/antsbees/checkpoint.pt")
    p.add_argument("--name", default="", help="served model name (default: the checkpoint's)")
    p.add_argument(
        "--data",
        default="",
        help="ImageFolder root for parity (default: the checkpoint's training data)",
    )
    p.add_argument("--split", default="val")
    p.add_argument("--model-repository", dest="repository", default="model_repository")
    p.add_argument(
        "--out-dir",
        default="",
        help="model.onnx and parity.json (default: the checkpoint's folder)",
    )
    p.add_argument(
        "--no-publish", dest="publish", action="store_false", help="export and check only"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="publish even if parity fails (recorded in the model card)",
    )
    p.add_argument(
        "--parity-limit",
        type=int,
        default=0,
        help="compare on a fixed random subset of N images (0: every image)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="max |logit diff| allowed (tighten only; at most 1e-3)",
    )
    p.add_argument("--max-batch-size", type=int, default=ServingConfig.max_batch_size)
    p.add_argument("--max-queue-delay-us", type=int, default=ServingConfig.max_queue_delay_us)
    p.add_argument("--instances", type=int, default=ServingConfig.instances)
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=ServingConfig.intra_op_threads,
        help="ONNX Runtime threads per served instance (0: ORT default)",
    )
    p.add_argument("--workers", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the export; errors print one clear line and exit non-zero."""
    a = parser().parse_args(argv)
    cfg = ExportConfig(
        checkpoint=a.checkpoint,
        name=a.name,
        data=a.data,
        split=a.split,
        repository=a.repository,
        out_dir=a.out_dir,
        publish=a.publish,
        force=a.force,
        workers=a.workers,
        atol=a.atol,
        parity_limit=a.parity_limit,
        serving=ServingConfig(
            a.max_batch_size, a.max_queue_delay_us, a.instances, a.intra_op_threads
        ),
    )
    try:
        run_export(cfg)
    except ParityFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
