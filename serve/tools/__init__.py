"""Measuring the served path: ``make bench`` (perf_analyzer against in-process
baselines, its report and plot), the Python load generator, perf_analyzer's install and
runs, and ``make soak`` (memory under load)."""

from serve.core.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "bench_inputs": ["BenchInputs"],
        "bench_report": ["write_report"],
        "loadgen": ["Level", "measure"],
        "soak": ["run_soak"],
    },
)
