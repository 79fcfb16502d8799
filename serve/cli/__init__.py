"""Command line: ``python -m serve`` run | classify | evaluate | models | load | unload |
restart | rollback | health | watchdog | bench | soak | manifests | perf-analyzer (torch-free):
the command list here, each group of commands in its own module of this package."""

from __future__ import annotations

from collections.abc import Sequence

from serve.cli.classify import (
    add_classify_arguments,
    add_evaluate_arguments,
    run_classify,
    run_evaluate,
)
from serve.cli.operate import (
    add_admin_arguments,
    add_health_arguments,
    add_models_arguments,
    add_watchdog_arguments,
    run_health,
    run_model_op,
    run_models,
    run_watchdog,
)
from serve.cli.run import add_run_arguments, run_run
from serve.cli.tools import (
    add_bench_arguments,
    add_manifests_arguments,
    add_soak_arguments,
    perf_analyzer_module,
    run_bench,
    run_manifests,
    run_soak_command,
)
from serve.core.cli_common import Command
from serve.core.cli_common import main as cli_main

COMMANDS = [
    Command("run", "run tritonserver in the foreground", add_run_arguments, run_run),
    Command(
        "classify",
        "classify image files with a served model",
        add_classify_arguments,
        run_classify,
    ),
    Command(
        "evaluate",
        "served accuracy on a labelled ImageFolder split",
        add_evaluate_arguments,
        run_evaluate,
    ),
    Command(
        "models",
        "list models, versions, their state, precision and accuracy",
        add_models_arguments,
        run_models,
    ),
    Command(
        "load", "load (or reload) a model from the repository", add_admin_arguments, run_model_op
    ),
    Command("unload", "unload a model", add_admin_arguments, run_model_op),
    Command(
        "restart",
        "fresh backend processes for a model (after a crash or hang)",
        add_admin_arguments,
        run_model_op,
    ),
    Command(
        "rollback",
        "serve the previous version (`load` undoes it)",
        add_admin_arguments,
        run_model_op,
    ),
    Command(
        "health",
        "server/model readiness and key Prometheus metrics",
        add_health_arguments,
        run_health,
    ),
    Command(
        "watchdog",
        "restart models whose python-backend stub died or hangs (for a server run elsewhere)",
        add_watchdog_arguments,
        run_watchdog,
    ),
    Command(
        "bench",
        "throughput/latency sweep vs in-process ONNX Runtime",
        add_bench_arguments,
        run_bench,
    ),
    Command(
        "soak",
        "sustained mixed load: failures and memory growth",
        add_soak_arguments,
        run_soak_command,
    ),
    Command(
        "chaos",
        "kill tritonservers and roll out a version under load: no failed request",
        lambda p: chaos_module().add_arguments(p),
        lambda a: chaos_module().run_command(a),
    ),
    Command(
        "manifests",
        "Kubernetes manifests for N Tritons serving the repository (make deploy-manifests)",
        lambda p: add_manifests_arguments(p),
        lambda a: run_manifests(a),
    ),
    Command(
        "perf-analyzer",
        "install or check Triton's perf_analyzer in this venv (make setup installs it)",
        lambda p: perf_analyzer_module().add_arguments(p),
        lambda a: perf_analyzer_module().run_command(a),
    ),
]


def chaos_module():  # noqa: ANN202 - the module, imported only when the command is used
    from serve.tools import chaos

    return chaos


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serve COMMAND ...``; errors print one clear line (exit 2)."""
    return cli_main(
        "python -m serve",
        "Serve the model repository with Triton, operate it, and classify images.",
        COMMANDS,
        argv,
    )
