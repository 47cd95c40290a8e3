"""``export.dtype=fp16``: a graph's weights, activations, keys and values in half precision."""

from __future__ import annotations

import tempfile
from pathlib import Path

from penwright.export import save  # (its limit read when called: tests lower it)


def half(graph, scratch: Path):
    """``export.dtype=fp16``: the fp32 graph with its weights, activations, keys and values in fp16 and its logits
    kept fp32 (onnxruntime's own float16 converter, which leaves the ops fp16 cannot run safely in fp32). Past
    protobuf's 2 GB (gpt2-large and up) the converter's shape inference cannot take the graph in memory: it runs
    on the graph saved in ``scratch`` with external weights instead."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if sum(t.ByteSize() for t in graph.graph.initializer) < save.EXTERNAL_DATA_BYTES:
        return convert_float_to_float16(graph, keep_io_types=["logits"])
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        fp32, typed = Path(tmp) / "fp32.onnx", Path(tmp) / "typed.onnx"
        save.save_graph(graph, fp32, external=True)
        onnx.shape_inference.infer_shapes_path(str(fp32), str(typed))
        graph = onnx.load(str(typed))  # (its weights read into memory from fp32.onnx.data)
    return convert_float_to_float16(graph, keep_io_types=["logits"], disable_shape_infer=True)
