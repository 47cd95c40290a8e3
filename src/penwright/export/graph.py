"""GPT-2's decoder with a KV cache, written directly as an ONNX graph (``export.graph=fused|lean``).

The same inputs, outputs and math as tracing transformers' module (``export.graph=transformers``),
with far fewer nodes: no shape arithmetic per layer, the mask built once for all layers, each
residual add folded into the layer norm that follows it. Fewer nodes is less onnxruntime overhead per
decoding step, which is most of the step for small models.

* ``fused`` (the default) uses onnxruntime's contrib operators (domain ``com.microsoft``):
  ``MultiHeadAttention`` with the past and present caches (the padding mask as its key padding
  mask, causality by its ``unidirectional`` flag), ``SkipLayerNormalization`` (residual add + bias
  + layer norm) and ``FastGelu`` (GELU's tanh form + bias): 42 nodes for 4 layers. It runs on
  onnxruntime only, which is what penwright's runtime is.
* ``lean`` spells the same graph in standard ONNX operators (opset 17): ~170 nodes for 4 layers,
  readable by any ONNX runtime.

``export`` checks either against PyTorch like any other graph; models they cannot express (another
activation, rescaled attention, fp16) fall back to tracing, saying why.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KINDS = ("fused", "lean")
CONTRIB = "com.microsoft"  # onnxruntime's contrib operator domain


def supported(config) -> str | None:
    """Why penwright's graphs cannot express this model (None: they can)."""
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"activation_function={config.activation_function}"
    for flag, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
    ):
        if bool(getattr(config, flag, want)) != want:
            return f"{flag}={getattr(config, flag)}"
    return None


def build_graph(model, kind: str = "fused", opset: int = 17) -> onnx.ModelProto:
    """The decoder graph of ``model`` (a GPT2LMHeadModel) with its fp32 weights as initializers."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    fused = kind == "fused"
    cfg = model.config
    n_layer, nh, e = cfg.n_layer, cfg.n_head, cfg.n_embd
    hd = e // nh
    eps = float(cfg.layer_norm_epsilon)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(name):
        return init(name, sd[name])

    def node(op, inputs, name, outputs=None, domain=None, **attrs):
        nodes.append(helper.make_node(op, inputs, outputs or [name], name=name, domain=domain, **attrs))
        return name

    def const(name, values, dtype=np.int64):
        return init(name, np.array(values, dtype=dtype))

    const("split3", [e, e, e])

    x = node(
        "Add",
        [
            node("Gather", [weight("transformer.wte.weight"), "input_ids"], "tok"),
            node("Gather", [weight("transformer.wpe.weight"), "position_ids"], "pos"),
        ],
        "x0",
    )
    # key j is visible to query i iff it is real and j <= past + i
    if fused:  # MultiHeadAttention applies both: the padding mask as int32 [b, T], causality by unidirectional=1
        padding = node("Cast", ["attention_mask"], "key_padding_mask", to=TensorProto.INT32)
    else:  # one additive mask [b, 1, s, T] for every layer
        const("zero", 0)
        const("one", 1)
        const("axes0", [0])
        const("axes1", [1])
        const("axes12", [1, 2])
        const("f_zero", 0.0, np.float32)
        const("f_min", np.finfo(np.float32).min, np.float32)
        seq = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), "one"], "seq", axis=0)
        total = node("Gather", [node("Shape", ["attention_mask"], "mask_shape"), "one"], "total", axis=0)
        kpos = node("Unsqueeze", [node("Range", ["zero", total, "one"], "kpos"), "axes0"], "kpos_row")
        qpos = node(
            "Unsqueeze",
            [node("Range", [node("Sub", [total, seq], "past_len"), total, "one"], "qpos"), "axes1"],
            "qpos_col",
        )
        real = node("Unsqueeze", [node("Greater", ["attention_mask", "zero"], "real"), "axes12"], "real4")
        allowed = node("And", [node("LessOrEqual", [kpos, qpos], "causal"), real], "allowed")
        bias = node("Where", [allowed, "f_zero", "f_min"], "bias")

    def layernorm(x, prefix, out):
        return node(
            "LayerNormalization", [x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias")], out, axis=-1, epsilon=eps
        )

    def residual_layernorm(x, delta, delta_bias, prefix, out):
        """(layernorm(x + delta + delta_bias), x + delta + delta_bias)."""
        if fused:
            node(
                "SkipLayerNormalization",
                [delta, x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias"), delta_bias],
                out,
                outputs=[out, "", "", f"{out}_sum"],
                domain=CONTRIB,
                epsilon=eps,
            )
            return out, f"{out}_sum"
        x = node("Add", [x, node("Add", [delta, delta_bias], f"{out}_delta")], f"{out}_sum")
        return layernorm(x, prefix, out), x

    def attention(h, i, p, past_key, past_value):
        """Self-attention of layer ``i`` over its past; returns the heads merged, before c_proj."""
        qkv = node("MatMul", [h, weight(f"{p}.attn.c_attn.weight")], f"l{i}_qkv")
        qkv_bias = weight(f"{p}.attn.c_attn.bias")
        if not fused:
            qkv = node("Add", [qkv, qkv_bias], f"l{i}_qkv_b")
        node("Split", [qkv, "split3"], f"l{i}_split", outputs=[f"l{i}_q0", f"l{i}_k0", f"l{i}_v0"], axis=2)
        if fused:
            return node(
                "MultiHeadAttention",
                [f"l{i}_q0", f"l{i}_k0", f"l{i}_v0", qkv_bias, padding, "", past_key, past_value],
                f"l{i}_y",
                outputs=[f"l{i}_y", f"present.{i}.key", f"present.{i}.value"],
                domain=CONTRIB,
                num_heads=nh,
                unidirectional=1,
            )
        q, k, v = (
            node(
                "Transpose",
                [node("Reshape", [f"l{i}_{t}0", "heads_shape"], f"l{i}_{t}_r")],
                f"l{i}_{t}",
                perm=[0, 2, 1, 3],
            )
            for t in "qkv"
        )
        k = node("Concat", [past_key, k], f"present.{i}.key", axis=2)
        v = node("Concat", [past_value, v], f"present.{i}.value", axis=2)
        scores = node(
            "Add",
            [
                node(
                    "Mul",
                    [node("MatMul", [q, node("Transpose", [k], f"l{i}_kt", perm=[0, 1, 3, 2])], f"l{i}_qk"), "scale"],
                    f"l{i}_scaled",
                ),
                bias,
            ],
            f"l{i}_scores",
        )
        y = node("MatMul", [node("Softmax", [scores], f"l{i}_att", axis=-1), v], f"l{i}_av")
        return node("Reshape", [node("Transpose", [y], f"l{i}_yt", perm=[0, 2, 1, 3]), "merge_shape"], f"l{i}_y")

    def gelu(f, f_bias, i):
        """gelu_new(f + f_bias): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))."""
        if fused:
            return node("FastGelu", [f, f_bias], f"l{i}_gelu", domain=CONTRIB)
        g = node("Add", [f, f_bias], f"l{i}_fc_b")
        g3 = node("Mul", [node("Mul", [g, g], f"l{i}_g2"), g], f"l{i}_g3")
        inner = node("Mul", [node("Add", [g, node("Mul", [g3, "g_k"], f"l{i}_kg3")], f"l{i}_sum"), "g_c"], f"l{i}_in")
        return node(
            "Mul",
            [
                node("Mul", [g, "g_half"], f"l{i}_hg"),
                node("Add", [node("Tanh", [inner], f"l{i}_tanh"), "g_one"], f"l{i}_1t"),
            ],
            f"l{i}_gelu",
        )

    if not fused:
        const("heads_shape", [0, 0, nh, hd])
        const("merge_shape", [0, 0, e])
        const("scale", 1.0 / np.sqrt(hd), np.float32)
        const("g_half", 0.5, np.float32)
        const("g_one", 1.0, np.float32)
        const("g_c", np.sqrt(2.0 / np.pi), np.float32)
        const("g_k", 0.044715, np.float32)

    past_in, present_out = [], []
    h = layernorm(x, "transformer.h.0.ln_1", "l0_ln1")
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        past_key, past_value = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        past_in += [past_key, past_value]
        present_out += [f"present.{i}.key", f"present.{i}.value"]
        y = node("MatMul", [attention(h, i, p, past_key, past_value), weight(f"{p}.attn.c_proj.weight")], f"l{i}_proj")
        h, x = residual_layernorm(x, y, weight(f"{p}.attn.c_proj.bias"), f"{p}.ln_2", f"l{i}_ln2")
        f = node("MatMul", [h, weight(f"{p}.mlp.c_fc.weight")], f"l{i}_fc")
        g = gelu(f, weight(f"{p}.mlp.c_fc.bias"), i)
        y = node("MatMul", [g, weight(f"{p}.mlp.c_proj.weight")], f"l{i}_mlp")
        after = f"transformer.h.{i + 1}.ln_1" if i + 1 < n_layer else "transformer.ln_f"
        h, x = residual_layernorm(x, y, weight(f"{p}.mlp.c_proj.bias"), after, f"l{i}_out")
    # the output projection, stored transposed ([embd, vocab]): a plain MatMul by an initializer, which
    # int8 dynamic quantization can quantize (GPT-2 ties it to wte: the file holds that matrix twice)
    head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    node("MatMul", [h, init("lm_head.weight.T", head.T)], "logits")

    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "seq"]),
    ]
    inputs += [helper.make_tensor_value_info(n, f32, ["batch_size", nh, "past", hd]) for n in past_in]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "seq", cfg.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, f32, ["batch_size", nh, "total", hd]) for n in present_out]
    graph = helper.make_graph(nodes, f"penwright-gpt2-{kind}", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(CONTRIB, 1)] if fused else [])
    m = helper.make_model(graph, opset_imports=opsets, producer_name="penwright")
    m.ir_version = 8  # what onnxruntime reads (onnx.helper's default may be newer)
    return m
