"""Measuring and judging: the images and logits of every stage (``stage_outputs``), the
parity gates and their verdicts (``parity``), the version through a real tritonserver
(``triton_parity``) and the parity report (``report``). The lowest room of export/: it
imports train and serve, never the other export rooms."""
