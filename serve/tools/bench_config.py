"""What ``python -m serve bench`` measures and how (torch-free): :class:`BenchConfig`, its
flags declared once (:data:`BENCH_FLAGS`, shared with ``python -m export bench``), bound
with :mod:`serve.core.flags`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from serve.core.flags import Flag, add_flags

Protocol = Literal["grpc", "grpc-shm", "http"]
InputKind = Literal["tensor", "raw"]
Distribution = Literal["poisson", "constant"]


@dataclass(frozen=True)
class BenchConfig:
    """The sweep's settings (the fields in the order of their flags: the report's
    ``settings``)."""

    # what is measured: the model, its images, protocols, inputs and load levels
    model: str = "antsbees"
    model_repository: str = "model_repository"
    data: str = ""
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    protocols: tuple[Protocol, ...] = ("grpc", "grpc-shm", "http")
    inputs: tuple[InputKind, ...] = ("tensor", "raw")
    request_rate: tuple[float, ...] = (10.0, 20.0)
    distribution: Distribution = "poisson"
    # how each level is measured: batch, windows, stability, time caps
    batch: int = 1
    window: float = 1.0
    stability: float = 10.0
    max_trials: int = 8
    max_seconds: float = 20.0
    # which server is measured, where the report goes, the docs table
    grpc_url: str = ""
    http_url: str = ""
    no_front: bool = False
    front_cost: bool = False
    lockout_seconds: float = 10.0
    replicas: int = 1
    out: str = "bench/local"
    table: str = ""


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A comma-separated list of ``choices``."""

    def parse(s: str) -> list[str]:
        names = s.split(",")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(repr, bad))}: not one of {', '.join(choices)}"
            )
        return names

    return parse


def _comma(parse: Callable[[str], list]) -> dict:
    """Flag settings: one comma-separated argument, not one argument per value."""
    return {"type": parse, "nargs": None}


LOAD_FLAGS = [
    Flag("model", "--model", "the classifier measured; raw inputs go to <model>_image"),
    Flag("model_repository", "--model-repository", "Triton model repository"),
    Flag("data", "--data", "ImageFolder split with images to send (.../val)"),
    Flag(
        "concurrency",
        "--concurrency",
        "closed-loop concurrency levels (comma-separated)",
        _comma(_ints),
    ),
    Flag(
        "protocols",
        "--protocols",
        "grpc-shm: gRPC with the pixels in system shared memory (same machine only)",
        _comma(_names(get_args(Protocol))),
    ),
    Flag(
        "inputs",
        "--inputs",
        "comma-separated; tensor: pixels preprocessed here, raw: encoded files to <model>_image",
        _comma(_names(get_args(InputKind))),
    ),
    Flag(
        "request_rate",
        "--request-rate",
        "open-loop request rates (requests/s) after the concurrency sweep ('' for none)",
        _comma(_floats),
    ),
    Flag("distribution", "--distribution", "arrivals of the request-rate runs"),
]

MEASUREMENT_FLAGS = [
    Flag("batch", "--batch", "images per request"),
    Flag("window", "--window", "seconds per measurement window"),
    Flag(
        "stability", "--stability", "perf_analyzer -s: %% that 3 consecutive windows may differ by"
    ),
    Flag("max_trials", "--max-trials", "perf_analyzer -r: windows before giving up"),
    Flag("max_seconds", "--max-seconds", "time cap per in-process baseline"),
]

SERVER_FLAGS = [
    Flag(
        "grpc_url",
        "--grpc-url",
        "bench a running server (e.g. the NGC container on a GPU host) instead of "
        "starting the bundled one",
    ),
    Flag("http_url", "--http-url", "with --grpc-url: its HTTP address"),
    Flag(
        "no_front",
        "--no-front",
        "measure the bundled tritonserver directly only (default: through the public front)",
        {"action": "store_true"},  # the field says no: a plain switch, not --no-X off
    ),
    Flag(
        "front_cost",
        "--front-cost",
        "also measure the front's cost: a few levels through the front and direct to "
        "Triton, in turn, twice each (about 16 levels more)",
    ),
    Flag(
        "lockout_seconds",
        "--lockout-seconds",
        "seconds per phase of the lockout figure: a normal client while slow senders, "
        "hostile images and silent connections try to lock it out of the bench's own "
        "stack (0: not measured)",
    ),
    Flag(
        "replicas",
        "--replicas",
        "N > 1: also one tritonserver against N behind the front, in alternating rounds "
        "(the same ONNX Runtime threads per core), with the CPU time per image",
    ),
    Flag("out", "--out", "folder of <model>-<date>.json, <model>-latest.json and .png"),
    Flag(
        "table",
        "--table",
        "print the docs table of a bench JSON (rows at --concurrency), exit",
        {"metavar": "JSON"},
    ),
]

BENCH_FLAGS = [*LOAD_FLAGS, *MEASUREMENT_FLAGS, *SERVER_FLAGS]


def add_bench_flags(p: argparse.ArgumentParser, cls: type[BenchConfig] = BenchConfig) -> None:
    """The sweep's flags on ``p`` (``cls``: a config that extends :class:`BenchConfig`)."""
    add_flags(p, cls, BENCH_FLAGS)


__all__ = ["BENCH_FLAGS", "BenchConfig", "Distribution", "InputKind", "Protocol", "add_bench_flags"]
