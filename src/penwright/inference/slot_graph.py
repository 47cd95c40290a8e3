"""The fused graph rewritten, when the engine loads it, for a cache that rows enter and leave.

The export writes one graph every runtime reads (onnxruntime, onnxruntime-web, optimum); the engine's
continuous batching needs another shape of it, made here in memory at load (``Engine.load``), so nothing in
the export folder depends on the engine's layout.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONTRIB = "com.microsoft"  # onnxruntime's contrib operator domain


def slot_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fused graph rewritten for a cache that rows enter and leave (``penwright.inference.engine``).

    Each ``MultiHeadAttention`` becomes onnxruntime's ``GroupQueryAttention`` on the packed q/k/v
    (bias added first), which reads and writes a preallocated buffer [batch, heads, capacity, head_dim]
    in place, at per-row lengths: inputs ``seqlens_k`` (int32 [batch], tokens already in each row's
    cache, this step's included, minus one) and ``total_sequence_length`` (int32 [1], the longest row)
    replace ``attention_mask``. The engine binds each ``present.*`` output to the memory of its
    ``past_key_values.*`` input, so a step appends one key and value per row and copies nothing else.
    Logits come only for the positions ``last_index`` picks in each row (int64 [batch, picked]; logits
    [batch, picked, vocab]): the last real token of each right-padded prompt in a prefill, 0 in a decoding
    step, or every position of a prompt whose tokens are scored (``echo`` with ``logprobs``).

    Raises ``ValueError`` (saying why) when the graph is not penwright's fused graph.
    """
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == CONTRIB]
    if not attention:
        raise ValueError(
            "it has no MultiHeadAttention nodes: it is not penwright's fused graph (export with export.graph=fused)"
        )
    producers = {out: n for n in graph.node for out in n.output}
    nh = next(a.i for a in attention[0].attribute if a.name == "num_heads")
    past_info = next(i for i in graph.input if i.name == attention[0].input[6])
    hd = past_info.type.tensor_type.shape.dim[3].dim_value
    if hd % 8:
        raise ValueError(f"its head size is {hd}: onnxruntime's GroupQueryAttention needs a multiple of 8")
    drop, replace = set(), {}
    for mha in attention:
        split = producers[mha.input[0]]
        if split.op_type != "Split" or list(split.output) != list(mha.input[:3]):
            raise ValueError(f"{mha.name}: its q, k, v do not come from one Split of the packed projection")
        qkv = split.input[0]
        biased = f"{mha.name}_qkv_biased"
        replace[id(mha)] = [
            helper.make_node("Add", [qkv, mha.input[3]], [biased], name=biased),
            helper.make_node(
                "GroupQueryAttention",
                [biased, "", "", mha.input[6], mha.input[7], "seqlens_k", "total_sequence_length"],
                list(mha.output),
                name=f"{mha.name}_gqa",
                domain=CONTRIB,
                num_heads=nh,
                kv_num_heads=nh,
            ),
        ]
        drop.add(id(split))
    for n in graph.node:
        if n.op_type == "Cast" and list(n.input) == ["attention_mask"]:
            drop.add(id(n))
    # logits of one position a row only: gather it from the final layer norm's output before the projection
    final = [n for n in graph.node if n.op_type == "SkipLayerNormalization"][-1].output[0]
    last = f"{final}_last"
    nodes = []
    for n in graph.node:
        if id(n) in drop:
            continue
        for i, name in enumerate(n.input):
            if name == final:
                n.input[i] = last
        nodes += replace.get(id(n), [n])
        if final in n.output:
            index = "last_index_nd"  # row b's positions last_index[b, :]: [batch, picked, 1] -> [batch, picked, embd]
            nodes.append(helper.make_node("Unsqueeze", ["last_index", "axis_last"], [index], name=index))
            nodes.append(helper.make_node("GatherND", [final, index], [last], name=last, batch_dims=1))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "axis_last"))
    del graph.node[:]
    graph.node.extend(nodes)

    inputs = [i for i in graph.input if i.name != "attention_mask"]
    for info in inputs + list(graph.output):
        if info.name.startswith(("past_key_values.", "present.")):
            info.type.tensor_type.shape.dim[2].dim_param = "capacity"
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("last_index", TensorProto.INT64, ["batch_size", "picked"]),
    ]
    del graph.input[:]
    graph.input.extend(inputs)
    logits = graph.output[0].type.tensor_type.shape.dim[1]
    logits.Clear()
    logits.dim_param = "picked"
    graph.name = graph.name + "-slots"
    return model
