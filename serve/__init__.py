"""Serving stage: run Triton on the model repository and talk to it (no torch here)."""
