"""Triton python-backend model: runs this version's ONNX file with ONNX Runtime (CPU).

A CPU version runs it (through ``model.py``, this package copied whole into each
version). Config parameters used:
``onnx_file`` (default model.onnx) and ``intra_op_threads`` (0: the cores this process
may use, shared out among the model's instances; one instance: ONNX Runtime's default).
Requests of one dynamic batch run as one ORT call; a bad request gets its own
error response and does not affect the others.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def intra_op_threads(config, params):
    """ONNX Runtime's intra-op threads for one instance: the config's value, else the
    cores this process may use divided among the instances (0 = ORT's default for one):
    a parallel section of a two-thread session waits for whichever thread the frontend
    or load generator took the core from (docs/benchmarks.md "Instances x threads")."""
    threads = int(params.get("intra_op_threads", "0") or 0)
    if threads > 0:
        return threads
    count = sum(int(g.get("count", 1) or 1) for g in config.get("instance_group", [])) or 1
    if count == 1:
        return 0
    return max(1, len(os.sched_getaffinity(0)) // count)


class ClassifierModel:
    """Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads(config, params)
        options.inter_op_num_threads = 1
        # No CPU memory arena: it keeps a large batch's memory for good, at the same
        # speed without it (docs/benchmarks.md "Memory after large batches").
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.ort_input = self.session.get_inputs()[0].name
        self.item_shape = tuple(int(d) for d in config["input"][0]["dims"])

    def _check(self, x):
        if x.dtype != np.float32:
            return f"input '{self.input_name}' must be FP32, got {x.dtype}"
        if x.ndim != 1 + len(self.item_shape) or tuple(x.shape[1:]) != self.item_shape:
            return (
                f"input '{self.input_name}' must have shape [batch, "
                f"{', '.join(map(str, self.item_shape))}], got {list(x.shape)}"
            )
        if not np.isfinite(x).all():
            return f"input '{self.input_name}' contains NaN or Inf values"
        return None

    def execute(self, requests):
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                problem = f"missing input '{self.input_name}'"
            else:
                x = tensor.as_numpy()
                problem = self._check(x)
            if problem:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
            else:
                good.append(i)
                arrays.append(x)
        if arrays:
            try:
                batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                logits = self.session.run(None, {self.ort_input: batch})[0]
                start = 0
                for i, x in zip(good, arrays, strict=True):
                    out = pb_utils.Tensor(self.output_name, logits[start : start + len(x)])
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                    start += len(x)
            except Exception as e:  # an ORT failure answers every request, never kills the model
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"inference failed: {e}")
                    )
        return responses

    def finalize(self):
        self.session = None
