"""penwright: reproducible GPT-2 finetuning on your own text, exported to a fast ONNX runtime."""

__version__ = "0.1.0"
