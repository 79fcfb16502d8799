"""The model repository side: Triton configs (``config``), staged publishing (``publish``),
warmup samples (``warmup``), loading into a live server (``deploy``), adding a GPU's
plan to a version (``engine_add``), and the two Triton-side python-backend models copied
into each version as ``model.py`` (``python_model``, ``preprocess_model``). Stands on
export.formats and export.checks."""
