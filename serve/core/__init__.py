"""The shared kernel every stage imports (torch-free, light): the model-card contract,
atomic files, bounded image decoding, the admin key, the error root, the CLI pattern,
machine facts and plots. ``train`` may import only this sub-package of ``serve``."""

from serve.core.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "card": ["ModelCard", "Metrics", "Preprocessing", "Pretrained"],
        "card_reader": ["CardError"],
        "errors": ["TrainServeError", "UserError", "UsageError", "SetupError", "GateRefused"],
        "files": ["atomic_write", "atomic_write_json", "publish_dir", "staged_dir", "WriteError"],
        # not the function ``preprocess``: the name is its module's (serve.core.preprocess)
        "preprocess": ["load_image", "ImageError", "Limits", "DEFAULT_LIMITS", "ResizeCrop"],
        "cli_common": ["Command", "main", "run_guarded"],
        "machine": ["machine_info", "cpu_model"],
        "plots": ["save_figure", "plot_confusion"],
    },
)
