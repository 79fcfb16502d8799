"""Measuring and judging: the stage names and the images every stage runs on
(``stages``, ``stage_outputs``), the parity gates and their verdicts (``parity``), the
parity report (``report``), the bundle that replays it (``bundle``) and the layer-by-layer
localization (``localize``). The lowest room of export/: it
imports train and serve, never the other export rooms."""
