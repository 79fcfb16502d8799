"""The names every stage shares (torch-free): the tensor names of every exported
classifier and of the image pipeline, the three model names one export publishes, and
the Triton config parameters a client or the preprocess model reads through the API.
With the model card (serve/core/card.py), the contract every stage shares."""

from __future__ import annotations

# Tensor names of every exported classifier and of the image pipeline.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_INPUT = "IMAGE"
PIXELS_OUTPUT = "PIXELS"
PIXEL_RANGE = (0.0, 255.0)

# The three models one export publishes: <name>, <name>_preprocess, <name>_image.
PREPROCESS_SUFFIX = "_preprocess"
IMAGE_SUFFIX = "_image"

# Triton config parameters a client or the preprocess model reads through the API.
PARAM_RESIZE = "preprocess_resize"
PARAM_CROP = "preprocess_crop"
PARAM_INTERPOLATION = "preprocess_interpolation"
PARAM_PIXEL_RANGE = "input_pixel_range"
PARAM_MAX_PIXELS = "max_pixels"
PARAM_MAX_RESIZED_PIXELS = "max_resized_pixels"
PARAM_MAX_ASPECT_RATIO = "max_aspect_ratio"
PARAM_MAX_IMAGE_BYTES = "max_image_bytes"
PARAM_MAX_FAST_WORK = "max_fast_work"  # decode work (pixel-passes) decoded in place
PARAM_DECODE_DEADLINE = "decode_deadline_s"  # an isolated (expensive) decode's deadline
PARAM_SLOW_LANE_SLOTS = "slow_lane_slots"  # isolated decodes at once, across instances
PARAM_DECODE_MEMORY = "decode_memory_bytes"  # a decoder process's address-space cap
PARAM_MAX_REQUEST_WORK = "max_request_work"  # decode work of one request's images
PARAM_REQUEST_DEADLINE = "request_deadline_s"  # one request's images decoded within


def image_model_name(name: str) -> str:
    """The raw-image ensemble of classifier ``name``."""
    return f"{name}{IMAGE_SUFFIX}"


def preprocess_model_name(name: str) -> str:
    """The server-side preprocessing model of classifier ``name``."""
    return f"{name}{PREPROCESS_SUFFIX}"


def classifier_name(model: str) -> str:
    """The classifier behind ``model`` (itself, or the one an ``_image`` ensemble feeds)."""
    for suffix in (IMAGE_SUFFIX, PREPROCESS_SUFFIX):
        if model.endswith(suffix) and len(model) > len(suffix):
            return model[: -len(suffix)]
    return model
