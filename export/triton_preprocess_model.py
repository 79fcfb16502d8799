"""Triton python-backend model: encoded image bytes -> the classifier's input pixels.

Copied into each published ``<model>_preprocess`` version as ``model.py``, next to
``image_preprocess.py`` (a copy of ``serve/preprocess.py``, the same decoder the
training data loader and the client use). Every step is read from the config's
parameters, which ``make export`` fills from the checkpoint's model card: decode with
Pillow, EXIF orientation, any mode -> RGB, Resize(shorter side) + CenterCrop, float32
0..255 CHW. A bad image fails its own request with a message naming the item; the
other requests of the same batch are answered normally.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_preprocess import ImageError, ResizeCrop, load_image, resize_crop  # noqa: E402


class TritonPythonModel:
    """Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.geometry = ResizeCrop(
            int(params["preprocess_resize"]),
            int(params["preprocess_crop"]),
            params.get("preprocess_interpolation", "bilinear"),
        )
        self.max_pixels = int(params.get("max_pixels", "40000000"))
        self.max_bytes = int(params.get("max_image_bytes", str(64 << 20)))
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def _pixels(self, item, index):
        data = item if isinstance(item, bytes) else bytes(item)
        if len(data) > self.max_bytes:
            raise ImageError(
                f"item {index}: {len(data)} bytes is over the {self.max_bytes} byte limit"
            )
        try:
            return resize_crop(load_image(data, self.max_pixels), self.geometry)
        except ImageError as e:
            raise ImageError(f"item {index}: {e}") from e

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            try:
                if tensor is None:
                    raise ImageError(f"missing input '{self.input_name}'")
                items = tensor.as_numpy().reshape(-1)
                pixels = np.stack([self._pixels(item, i) for i, item in enumerate(items)])
                out = pb_utils.Tensor(self.output_name, pixels)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as e:  # one bad request never affects the others
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad image: {e}"))
                )
        return responses

    def finalize(self):
        pass
