"""Tools around an export, each a ``python -m export`` subcommand: the benchmark with
its torch/TensorRT baselines (``bench``, ``baselines``; ``make bench``), the serving
tuner (``tune``, ``tune_config``, ``tune_trials``, ``tune_report``; ``make tune``), the
INT8 calibration search (``calibration_search``) and the first-request benchmark
(``warmup_bench``)."""
