"""Triton python-backend model: encoded image bytes -> the classifier's input pixels.

Copied into each published ``<model>_preprocess`` version as ``model.py``, next to
``image_preprocess.py`` and ``image_isolated_decode.py`` (copies of
``serve/core/preprocess.py`` and ``serve/core/isolated_decode.py``, the same decoder the
training data loader and the client use). Every step is read from the config's
parameters, which ``make export`` fills from the model card: decode with Pillow (the
served formats only), EXIF orientation, any mode -> RGB, Resize(shorter side) +
CenterCrop, float32 0..255 CHW. The work per image is bounded before anything big is
allocated (encoded bytes, source pixels, aspect ratio, resize target: the ``max_*``
parameters), and in time: an image whose header promises more decode work than
``max_fast_work`` is decoded in a forked child killed at ``decode_deadline_s``, in one of
``slow_lane_slots`` places shared by every instance of the model (a full lane answers
"server busy" at once), so expensive images never hold every instance while cheap ones
wait. The model has no dynamic batching: each request is decoded on its own, and a slow
one never delays a request batched with it.

A request with several images is answered as a whole: if any item is bad, the request
fails with ``bad image: item k: <reason>`` naming the first bad item, and no pixels are
produced for it. The other requests of the same dynamic batch are answered normally,
and the model stays healthy (every exception is caught per request).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_isolated_decode import SlowLane, preprocess_bounded  # noqa: E402
from image_preprocess import (  # noqa: E402
    SLOW_LANE_SLOTS,
    DecodeBusy,
    ImageError,
    Limits,
    ResizeCrop,
)


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
        defaults = Limits()
        self.limits = Limits(
            max_bytes=int(params.get("max_image_bytes", defaults.max_bytes)),
            max_pixels=int(params.get("max_pixels", defaults.max_pixels)),
            max_aspect_ratio=float(params.get("max_aspect_ratio", defaults.max_aspect_ratio)),
            max_resized_pixels=int(params.get("max_resized_pixels", defaults.max_resized_pixels)),
            max_fast_work=int(params.get("max_fast_work", defaults.max_fast_work)),
            decode_deadline_s=float(params.get("decode_deadline_s", defaults.decode_deadline_s)),
        )
        slots = int(params.get("slow_lane_slots", SLOW_LANE_SLOTS))
        try:
            self.lane = SlowLane.for_model(args["model_name"], slots)
        except OSError as e:  # no private folder: isolated decodes, without the shared bound
            pb_utils.Logger.log_warn(f"slow-image lane unavailable ({e}); decodes still isolated")
            self.lane = None
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def _pixels(self, item, index):
        data = item if isinstance(item, bytes) else bytes(item)
        try:
            return preprocess_bounded(data, self.geometry, self.limits, self.lane)
        except DecodeBusy:
            raise
        except ImageError as e:
            raise ImageError(f"item {index}: {e}") from e
        except Exception as e:  # never an empty reason, whatever failed
            raise ImageError(f"item {index}: {type(e).__name__}: {e}") from e

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
            except DecodeBusy as e:  # not a bad image: the client may retry
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
            except Exception as e:  # one bad request never affects the others
                reason = str(e) or type(e).__name__
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad image: {reason}"))
                )
        return responses

    def finalize(self):
        pass
