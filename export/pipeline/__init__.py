"""The export run (``python -m export``): its config (``config``), its fixed inputs
(``job``), the parity ledger (``ledger``), the steps (``build``, ``precision``,
``precision_fallback``, ``outcome``) and the run that calls them in order
(:func:`~export.pipeline.release.run_export`)."""
