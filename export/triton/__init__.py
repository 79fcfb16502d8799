"""The model repository side: Triton configs (``config``), staged publishing (``publish``),
warmup samples (``warmup``), loading into a live server (``deploy``), adding a GPU's
plan to a version (``engine_add``); the python backend's code it copies into each version
is the package serve/backend. Stands on export.formats and export.checks."""
