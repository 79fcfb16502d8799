"""The model files an export makes: ONNX with normalization inside (``onnx_export``, its
cache ``onnx_cache``), FP16 (``fp16``), INT8 Q/DQ (``int8``), TensorRT and TensorRT-RTX
engines (``tensorrt_engine``). Stands on export.checks (the pixel batches it calibrates
and runs on)."""
