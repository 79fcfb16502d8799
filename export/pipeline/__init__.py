"""The export run (``python -m export``): its config (``config``), its fixed inputs
(``job``), the parity ledger (``ledger``), the steps (``build``, ``precision``,
``precision_fallback``, ``outcome``) and the ordered list that runs them (``release``:
:data:`~export.pipeline.release.STEPS`, :func:`~export.pipeline.release.run_export`)."""
