"""GPT-2's decoder with a KV cache, written directly as an ONNX graph (``export.graph=lean``).

The same inputs, outputs and math as tracing transformers' module (``export.graph=transformers``),
but ~170 nodes for 4 layers instead of ~960: no shape arithmetic per layer (heads are split with a
constant ``Reshape`` to ``[0, 0, heads, head_dim]``), one additive mask for all layers, the
attention scale and GELU spelled out. Fewer nodes is less onnxruntime overhead per decoding step,
which is most of the step for small models. ``export`` checks its parity against PyTorch like any
other graph, and models it cannot express (another activation, rescaled attention) fall back to
tracing, saying why.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def lean_supported(config) -> str | None:
    """Why the lean graph cannot express this model (None: it can)."""
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"activation_function={config.activation_function}"
    for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if bool(getattr(config, flag, want)) != want:
            return f"{flag}={getattr(config, flag)}"
    return None


def build_lean_graph(model, opset: int = 17) -> onnx.ModelProto:
    """The decoder graph of ``model`` (a GPT2LMHeadModel) with its fp32 weights as initializers."""
    cfg = model.config
    n_layer, nh, e = cfg.n_layer, cfg.n_head, cfg.n_embd
    hd = e // nh
    eps = float(cfg.layer_norm_epsilon)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(name, values, dtype=np.int64):
        return init(name, np.array(values, dtype=dtype))

    const("heads_shape", [0, 0, nh, hd]); const("merge_shape", [0, 0, e]); const("split3", [e, e, e])
    const("zero", 0); const("one", 1); const("axes0", [0]); const("axes1", [1]); const("axes12", [1, 2])
    init("f_zero", np.array(0.0, np.float32)); init("f_min", np.array(np.finfo(np.float32).min, np.float32))
    init("scale", np.array(1.0 / np.sqrt(hd), np.float32))
    init("g_half", np.array(0.5, np.float32)); init("g_one", np.array(1.0, np.float32))
    init("g_c", np.array(np.sqrt(2.0 / np.pi), np.float32)); init("g_k", np.array(0.044715, np.float32))

    wte = init("wte", sd["transformer.wte.weight"])
    init("wpe", sd["transformer.wpe.weight"])
    x = node("Add", [node("Gather", [wte, "input_ids"], "tok"), node("Gather", ["wpe", "position_ids"], "pos")], "x0")
    # additive mask [b, 1, s, T]: key j is visible to query i iff it is real and j <= past + i
    seq = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), "one"], "seq", axis=0)
    total = node("Gather", [node("Shape", ["attention_mask"], "mask_shape"), "one"], "total", axis=0)
    past_len = node("Sub", [total, seq], "past_len")
    kpos = node("Unsqueeze", [node("Range", ["zero", total, "one"], "kpos"), "axes0"], "kpos_row")
    qpos = node("Unsqueeze", [node("Range", [past_len, total, "one"], "qpos"), "axes1"], "qpos_col")
    causal = node("LessOrEqual", [kpos, qpos], "causal")
    real = node("Unsqueeze", [node("Greater", ["attention_mask", "zero"], "real"), "axes12"], "real4")
    bias = node("Where", [node("And", [causal, real], "allowed"), "f_zero", "f_min"], "bias")

    def linear(x, prefix, out):
        w = init(f"{prefix}.weight", sd[f"{prefix}.weight"])
        b = init(f"{prefix}.bias", sd[f"{prefix}.bias"])
        return node("Add", [node("MatMul", [x, w], f"{out}_mm"), b], out)

    def layernorm(x, prefix, out):
        return node("LayerNormalization", [x, init(f"{prefix}.weight", sd[f"{prefix}.weight"]),
                                           init(f"{prefix}.bias", sd[f"{prefix}.bias"])], out, axis=-1, epsilon=eps)

    def heads(x, out):
        return node("Transpose", [node("Reshape", [x, "heads_shape"], f"{out}_r")], out, perm=[0, 2, 1, 3])

    past_in, present_out = [], []
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        h = layernorm(x, f"{p}.ln_1", f"l{i}_ln1")
        qkv = linear(h, f"{p}.attn.c_attn", f"l{i}_qkv")
        nodes.append(helper.make_node("Split", [qkv, "split3"], [f"l{i}_q0", f"l{i}_k0", f"l{i}_v0"], axis=2,
                                      name=f"l{i}_split"))
        q = heads(f"l{i}_q0", f"l{i}_q")
        k = node("Concat", [f"past_key_values.{i}.key", heads(f"l{i}_k0", f"l{i}_k")], f"present.{i}.key", axis=2)
        v = node("Concat", [f"past_key_values.{i}.value", heads(f"l{i}_v0", f"l{i}_v")], f"present.{i}.value", axis=2)
        past_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present_out += [k, v]
        kt = node("Transpose", [k], f"l{i}_kt", perm=[0, 1, 3, 2])
        scores = node("Add", [node("Mul", [node("MatMul", [q, kt], f"l{i}_qk"), "scale"], f"l{i}_scaled"), bias],
                      f"l{i}_scores")
        att = node("Softmax", [scores], f"l{i}_att", axis=-1)
        y = node("Transpose", [node("MatMul", [att, v], f"l{i}_av")], f"l{i}_y", perm=[0, 2, 1, 3])
        y = linear(node("Reshape", [y, "merge_shape"], f"l{i}_merged"), f"{p}.attn.c_proj", f"l{i}_proj")
        x = node("Add", [x, y], f"l{i}_x1")
        f = linear(layernorm(x, f"{p}.ln_2", f"l{i}_ln2"), f"{p}.mlp.c_fc", f"l{i}_fc")
        # gelu_new: 0.5 f (1 + tanh(sqrt(2/pi) (f + 0.044715 f^3)))
        f3 = node("Mul", [node("Mul", [f, f], f"l{i}_f2"), f], f"l{i}_f3")
        inner = node("Mul", [node("Add", [f, node("Mul", [f3, "g_k"], f"l{i}_kf3")], f"l{i}_sum"), "g_c"], f"l{i}_in")
        g = node("Mul", [node("Mul", [f, "g_half"], f"l{i}_hf"),
                         node("Add", [node("Tanh", [inner], f"l{i}_tanh"), "g_one"], f"l{i}_1t")], f"l{i}_gelu")
        x = node("Add", [x, linear(g, f"{p}.mlp.c_proj", f"l{i}_mlp")], f"l{i}_x2")
    x = layernorm(x, "transformer.ln_f", "ln_f")
    # the output projection, stored transposed ([embd, vocab]): a plain MatMul by an initializer, which
    # int8 dynamic quantization can quantize (GPT-2 ties it to wte: the file holds that matrix twice)
    head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    node("MatMul", [x, init("lm_head.weight.T", head.T)], "logits")

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [helper.make_tensor_value_info(n, f32, ["batch", nh, "past", hd]) for n in past_in]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, f32, ["batch", nh, "total", hd]) for n in present_out]
    graph = helper.make_graph(nodes, "penwright-gpt2", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="penwright")
    m.ir_version = 8  # what onnxruntime reads (onnx.helper's default may be newer)
    return m

