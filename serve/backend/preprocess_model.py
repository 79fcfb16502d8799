"""Triton python-backend model: encoded image bytes -> the classifier's input pixels.

The ``<model>_preprocess`` versions run it (through ``model.py``, this package copied whole
into each version), with the same decoder the training data loader and the client use
(``preprocess.py``, ``isolated_decode.py``, ``image_scan.py``). Every step is read from the
config's parameters, which ``make export`` fills from the model card: decode with Pillow
(the served formats only, known by their first bytes), EXIF orientation, any mode -> RGB,
Resize(shorter side) + CenterCrop, float32 0..255 CHW. Each request's images are read for
their structure before any decoder runs (encoded bytes, source pixels, aspect ratio, the
estimated decode work of each and of all: the ``max_*`` parameters), then every one is
decoded out of this process under a deadline and a memory cap: a cheap one in the instance's
reused decoder process, one whose structure promises more work than ``max_fast_work`` in a
forked child killed at ``decode_deadline_s``, in one of ``slow_lane_slots`` places shared by
every instance of the model (a full lane answers "server busy" at once), so expensive images
never hold every instance while cheap ones wait. A request whose client has cancelled, or
whose ``request_deadline_s`` passed, stops being decoded. The model has no dynamic batching:
each request is decoded on its own, and a slow one never delays a request batched with it.

A request with several images is answered as a whole: if any item is bad, the request
fails with ``bad image: item k: <reason>`` naming the first bad item, and no pixels are
produced for it. The other requests of the same dynamic batch are answered normally,
and the model stays healthy (every exception is caught per request).
"""

import json

import triton_python_backend_utils as pb_utils

from .isolated_decode import DecodeWorker, SlowLane, preprocess_request
from .preprocess import SLOW_LANE_SLOTS, DecodeBusy, ImageError, Limits, ResizeCrop


class PreprocessModel:
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
            decode_memory_bytes=int(
                params.get("decode_memory_bytes", defaults.decode_memory_bytes)
            ),
            max_request_work=int(params.get("max_request_work", defaults.max_request_work)),
            request_deadline_s=float(params.get("request_deadline_s", defaults.request_deadline_s)),
        )
        # this instance's decoder process (forked on first use, again after a kill)
        self.worker = DecodeWorker(self.geometry, self.limits)
        slots = int(params.get("slow_lane_slots", SLOW_LANE_SLOTS))
        try:
            self.lane = SlowLane.for_model(args["model_name"], slots)
        except OSError as e:  # no private folder: isolated decodes, without the shared bound
            pb_utils.Logger.log_warn(f"slow-image lane unavailable ({e}); decodes still isolated")
            self.lane = None
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def _pixels(self, request, items):
        data = [item if isinstance(item, bytes) else bytes(item) for item in items]
        cancelled = getattr(request, "is_cancelled", lambda: False)
        try:
            return preprocess_request(
                data, self.geometry, self.limits, self.lane, self.worker, cancelled
            )
        except (DecodeBusy, ImageError):
            raise
        except Exception as e:  # never an empty reason, whatever failed
            raise ImageError(f"{type(e).__name__}: {e}") from e

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            try:
                if tensor is None:
                    raise ImageError(f"missing input '{self.input_name}'")
                pixels = self._pixels(request, tensor.as_numpy().reshape(-1))
                out = pb_utils.Tensor(self.output_name, pixels)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except DecodeBusy as e:  # not a bad image: the client may retry
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
            except Exception as e:  # one bad request never affects the others
                reason = str(e) or type(e).__name__
                bad = pb_utils.TritonError(f"bad image: {reason}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=bad))
        return responses

    def finalize(self):
        self.worker.close()
