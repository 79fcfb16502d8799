"""The shared kernel every stage imports (torch-free, light): the model-card contract,
atomic files, the admin key, the errors beyond the root, the CLI pattern, machine facts
and plots. ``train`` may import only this sub-package of ``serve`` and serve.backend
(bounded image decoding and the error root, the code Triton runs)."""

from serve.core.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "card": ["ModelCard", "Metrics", "Preprocessing", "Pretrained"],
        "card_reader": ["CardError"],
        "errors": ["SetupError", "GateRefused"],
        "files": ["atomic_write", "atomic_write_json", "publish_dir", "staged_dir", "WriteError"],
        "cli_common": ["Command", "main", "run_guarded"],
        "machine": ["machine_info", "cpu_model"],
        "plots": ["save_figure", "plot_confusion"],
    },
)
