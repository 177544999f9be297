"""Export stage: surrogate to ONNX, precision variants, TensorRT engines, bundles (``rrise-export``)."""
