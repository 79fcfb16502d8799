"""What ``python -m export tune`` (``make tune``) searches and how: :class:`TuneConfig`
and its flags, declared once (:data:`TUNE_FLAGS`, bound with :mod:`serve.core.flags`)."""

from __future__ import annotations

from dataclasses import dataclass

from serve.core.flags import Flag


@dataclass(frozen=True)
class TuneConfig:
    """The search: the model, its grid, the budget, how each level is measured, and what
    is done with the winner (the fields in the order of their flags: the report's
    ``settings``)."""

    model: str = "antsbees"
    model_repository: str = "model_repository"
    data: str = ""
    p99_ms: float = 200.0
    instances: tuple[int, ...] = (1, 2)
    max_batch_sizes: tuple[int, ...] = (8, 64)
    delays_us: tuple[int, ...] = (0, 2000)
    concurrency: tuple[int, ...] = (1, 4, 16)
    window: float = 1.0
    stability: float = 10.0
    max_trials: int = 6
    min_gain: float = 1.05
    out: str = "bench/local"
    publish: bool = False
    table: str = ""


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


_COMMA = {"type": _ints, "nargs": None}  # one comma-separated argument

TUNE_FLAGS = [
    Flag("model", "--model", "the classifier whose serving config is searched"),
    Flag("model_repository", "--model-repository", "Triton model repository"),
    Flag("data", "--data", "ImageFolder split with images (.../val)"),
    Flag("p99_ms", "--p99-ms", "the p99 latency budget"),
    Flag("instances", "--instances", "instance counts to try (comma-separated)", _COMMA),
    Flag(
        "max_batch_sizes", "--max-batch-sizes", "max batch sizes to try (comma-separated)", _COMMA
    ),
    Flag(
        "delays_us",
        "--delays-us",
        "dynamic batching max queue delays to try, microseconds (comma-separated)",
        _COMMA,
    ),
    Flag(
        "concurrency",
        "--concurrency",
        "concurrency levels each config is measured at (comma-separated)",
        _COMMA,
    ),
    Flag("window", "--window", "seconds per measurement window"),
    Flag(
        "stability", "--stability", "perf_analyzer -s: %% that 3 consecutive windows may differ by"
    ),
    Flag("max_trials", "--max-trials", "perf_analyzer -r: windows before a level is unstable"),
    Flag(
        "min_gain",
        "--min-gain",
        "publish a config only if it beats the current one by this factor (noise)",
    ),
    Flag("out", "--out", "folder of <model>-tune.json and .png"),
    Flag(
        "publish",
        "--publish",
        "write the winner into the model's config (a config change, no new version)",
    ),
    Flag("table", "--table", "print the docs table, exit", {"metavar": "JSON"}),
]
