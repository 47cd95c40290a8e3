"""Stage ``export``: the trained model -> ONNX graphs (fused, lean, traced, quantized) and GGUF (``stage.export``)."""
