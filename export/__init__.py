"""Export stage: checkpoint -> ONNX (normalization inside) -> parity gate -> model repository."""
