"""Tracing transformers' own GPT-2 module into an ONNX decoder graph (``export.graph=transformers``, and any model
penwright's own graphs cannot express).

Transformers 5 keeps its cache in ``DynamicCache`` objects, so a small wrapper takes flat key/value tensors,
builds the cache, and returns the flat presents; the TorchScript exporter traces it with a past of length 2
and a sequence of 3, every length dynamic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache, GPT2LMHeadModel


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class DecoderWithPast(torch.nn.Module):
    """GPT-2 as a function of flat tensors: (ids, mask, positions, *past) -> (logits, *present)."""

    def __init__(self, model: GPT2LMHeadModel):
        super().__init__()
        self.model = model
        self.n_layer = model.config.n_layer

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layer)])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits.float(), *present)


def export_graph(model: GPT2LMHeadModel, path: Path, opset: int) -> None:
    """Trace the wrapper with the TorchScript exporter (a past of length 2, a sequence of 3)."""
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    batch, seq, past_len = 2, 3, 2
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [torch.zeros(batch, cfg.n_head, past_len, head_dim, dtype=dtype) for _ in range(2 * cfg.n_layer)]
    inputs, outputs = io_names(cfg.n_layer)
    axes = {
        "input_ids": {0: "batch_size", 1: "seq"},
        "attention_mask": {0: "batch_size", 1: "total"},
        "position_ids": {0: "batch_size", 1: "seq"},
        "logits": {0: "batch_size", 1: "seq"},
    }
    axes |= {n: {0: "batch_size", 2: "past"} for n in inputs[3:]}
    axes |= {n: {0: "batch_size", 2: "total"} for n in outputs[1:]}
    with torch.no_grad():
        torch.onnx.export(
            DecoderWithPast(model).eval(),
            (ids, mask, pos, *past),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
