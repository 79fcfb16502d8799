"""The contract every stage shares (torch-free): tensor and model names, limits, Triton
config parameter names, and the model card.

A :class:`ModelCard` says everything the next stage needs about a model - architecture,
classes, input tensor, eval preprocessing and where normalization happens, provenance
(including the pretrained fallback), metrics, parity and precision, files with their
sha256, cost per image - in the spirit of timm's ``PretrainedCfg`` and torchvision's
``Weights.meta``. Training writes it into every checkpoint; export completes it and
publishes it as ``<version>/model_card.json``; serving, benchmarks and clients read it.
``ModelCard.from_dict`` validates and names the first thing that is wrong; the
published card holds no machine-local path (file names and hashes only).

Where each part lives (every name still imports from here): the tensor, model and
Triton parameter names in serve/core/names.py, the card and its parts in
serve/core/card.py, the strict reader and :class:`CardError` in serve/core/card_reader.py;
the image limits come from serve/core/preprocess.py.
"""

from __future__ import annotations

from serve.core.card import (  # noqa: F401 - the contract's names, re-exported
    NORMALIZATION,
    PRECISIONS,
    SCHEMA,
    TARGET_KINDS,
    Metrics,
    ModelCard,
    OutputSpec,
    ParitySummary,
    Preprocessing,
    Pretrained,
    Provenance,
    TensorSpec,
    redact_paths,
)
from serve.core.card_reader import CardError
from serve.core.names import (  # noqa: F401 - the contract's names, re-exported
    IMAGE_INPUT,
    IMAGE_SUFFIX,
    INPUT_NAME,
    OUTPUT_NAME,
    PARAM_CROP,
    PARAM_DECODE_DEADLINE,
    PARAM_INTERPOLATION,
    PARAM_MAX_ASPECT_RATIO,
    PARAM_MAX_FAST_WORK,
    PARAM_MAX_IMAGE_BYTES,
    PARAM_MAX_PIXELS,
    PARAM_MAX_RESIZED_PIXELS,
    PARAM_PIXEL_RANGE,
    PARAM_RESIZE,
    PARAM_SLOW_LANE_SLOTS,
    PIXEL_RANGE,
    PIXELS_OUTPUT,
    PREPROCESS_SUFFIX,
    classifier_name,
    image_model_name,
    preprocess_model_name,
)
from serve.core.preprocess import (  # noqa: F401 - the limits every stage shares
    DECODE_DEADLINE_S,
    DEFAULT_INTERPOLATION,
    MAX_ASPECT_RATIO,
    MAX_FAST_WORK,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    MAX_RESIZED_PIXELS,
    RESAMPLING,
    SERVED_FORMATS,
    SLOW_LANE_SLOTS,
)

__all__ = [
    "DECODE_DEADLINE_S",
    "DEFAULT_INTERPOLATION",
    "MAX_ASPECT_RATIO",
    "MAX_FAST_WORK",
    "MAX_IMAGE_BYTES",
    "MAX_PIXELS",
    "MAX_RESIZED_PIXELS",
    "SERVED_FORMATS",
    "SLOW_LANE_SLOTS",
    "CardError",
    "ModelCard",
]
