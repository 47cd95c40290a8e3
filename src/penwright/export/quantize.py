"""``export.quantize``: 8- and 4-bit graphs written beside the fp32 one, and how close each stays to it
(loss and top-1 agreement on validation windows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from penwright.core.errors import PenwrightError
from penwright.export.gguf import BLOCK  # q8/q4 use q8_0's blocks
from penwright.export.parity import graph_logits
from penwright.export.save import GRAPH, save_graph

QUANTIZED = {  # export.quantize: the graph file each writes beside model.onnx
    "q8": "model.q8.onnx",  # MatMulNBits: 8-bit weights, one scale per 32 (llama.cpp's q8_0 layout), int8 math
    "q4": "model.q4.onnx",  # MatMulNBits: 4-bit weights, one scale per 32 (q4_0's layout), int8 math
    "int8": "model.int8.onnx",  # dynamic quantization: one scale per weight matrix, per-tensor int8 activations
}


def quantize_int8(src: Path, dst: Path) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnx's shape inference cannot type the outputs of onnxruntime's contrib ops (fused graph): they are fp32
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": TensorProto.FLOAT}
    )


def quantize_blocks(src: Path, dst: Path, bits: int) -> None:
    """Every MatMul by a weight matrix (attention, MLP, output) as onnxruntime's MatMulNBits: symmetric
    ``bits``-bit weights with one fp32 scale per block of 32 input rows, computed with int8 activations
    (accuracy level 4: what makes it fast on CPUs with int8 dot products)."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=BLOCK, is_symmetric=True, accuracy_level=4, algo_config=config
    )
    quantizer.process()
    save_graph(quantizer.model.model, dst)


def quantize(src: Path, kind: str) -> Path:
    """Write the ``kind`` graph (export.quantize) of the fp32 graph ``src`` beside it."""
    dst = src.parent / QUANTIZED[kind]
    if kind == "int8":
        quantize_int8(src, dst)
    else:
        quantize_blocks(src, dst, bits=int(kind[1:]))
    return dst


# -- quality against fp32 ---------------------------------------------------------------------------


def validation_windows(prepared: Path, block: int, windows: int = 8) -> np.ndarray:
    """``windows`` token windows of ``block`` + 1 tokens spread evenly over the validation split (the
    training split when there is none): inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    from penwright.train.data import TokenWindows, load_tokens

    if not (prepared / "meta.json").is_file():
        raise PenwrightError(
            f"{prepared}: no prepared corpus to measure the quantized models on; run "
            "`penwright prepare` first (or set export.quantize=[])"
        )
    tokens = load_tokens(prepared, "val")
    if tokens.size == 0:
        tokens = load_tokens(prepared, "train")
    w = TokenWindows(tokens, block, name="val")
    picks = np.linspace(0, len(w) - 1, num=min(windows, len(w))).round().astype(int)
    return np.stack([w[i] for i in picks])


def mean_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return round(float(-np.take_along_axis(logp, targets[..., None], -1).mean()), 5)


def quantized_quality(model, onnx_dir: Path, kinds: list[str], prepared: Path, block: int, windows: int = 8) -> dict:
    """Each quantized graph against fp32 on validation windows: its loss, its size, and how often its top-1
    next token equals fp32's (every position of every window)."""
    batch = validation_windows(prepared, min(block, model.config.n_positions - 1), windows)
    ids, targets = batch[:, :-1], batch[:, 1:]
    logits = graph_logits(onnx_dir, GRAPH, ids)
    top1 = logits.argmax(-1)
    result: dict[str, Any] = {
        "windows": len(ids),
        "tokens": int(ids.size),
        "fp32_loss": mean_loss(logits, targets),
        "fp32_mb": round((onnx_dir / GRAPH).stat().st_size / 1e6, 2),
    }
    for kind in kinds:
        logits = graph_logits(onnx_dir, QUANTIZED[kind], ids)
        result[kind] = {
            "graph": QUANTIZED[kind],
            "loss": mean_loss(logits, targets),
            "top1_agreement": round(float((logits.argmax(-1) == top1).mean()), 4),
            "mb": round((onnx_dir / QUANTIZED[kind]).stat().st_size / 1e6, 2),
        }
    return result
