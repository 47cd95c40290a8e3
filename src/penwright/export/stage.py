"""Stage ``export``: the trained model -> one ONNX decoder graph with a KV cache, checked against PyTorch.

The graph (optimum's names, so tools that know them can read it):

* inputs: ``input_ids`` [batch_size, seq], ``attention_mask`` [batch_size, past+seq], ``position_ids`` [batch_size, seq],
  ``past_key_values.{i}.key`` / ``.value`` [batch_size, heads, past, head_dim] for every layer;
* outputs: ``logits`` [batch_size, seq, vocab] (fp32), ``present.{i}.key`` / ``.value`` [batch_size, heads, past+seq, head_dim].

Batch, sequence and past lengths are dynamic; the first step feeds a zero-length past, so one
graph serves prefill and decoding. Transformers 5 keeps its cache in ``DynamicCache`` objects, so
a small wrapper takes flat key/value tensors, builds the cache, and returns the flat presents.

The stage fails unless parity holds: logits vs PyTorch on a left-padded batch (real positions
only) with an empty and a non-empty past, and greedy tokens of the runtime equal to
``transformers`` ``generate(do_sample=False)``. The figures go to ``reports/export.json``.

The work is in modules of one job each: ``graph`` (penwright's own graphs), ``trace`` (transformers' module
traced), ``fp16``, ``quantize``, ``parity``, ``gguf`` and ``save``; this module checks the config, runs them
in order into a staged folder, and keeps the folder only when parity holds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from penwright.core import schema
from penwright.core.atomic import atomic_write_text, staged_dir
from penwright.core.chat_format import ChatFormat
from penwright.core.errors import ConfigError, PenwrightError
from penwright.core.files import load_model, load_tokenizer, save_tokenizer
from penwright.core.log import get_logger
from penwright.export.card import link_for_transformers_js, write_card
from penwright.export.fp16 import half
from penwright.export.gguf import check_gguf, export_gguf
from penwright.export.parity import parity
from penwright.export.quantize import quantize, quantized_quality
from penwright.export.save import GRAPH, node_count, save_graph, save_with_external_data_if_large
from penwright.export.trace import export_graph

log = get_logger("export").info
warn = get_logger("export").warning


def choose_graph(wanted: str, config) -> str:
    """``fused`` or ``lean`` (penwright's own graphs) when they can express the model, else ``transformers``
    (traced)."""
    from penwright.export.graph import KINDS, supported

    if wanted not in (*KINDS, "transformers"):
        raise ConfigError(f"export.graph={wanted!r}: use {', '.join(KINDS)} or transformers")
    if wanted in KINDS:
        why = supported(config)
        if why is None:
            return wanted
        log(f"export.graph={wanted} cannot express this model ({why}): tracing transformers' module instead")
    return "transformers"


def export(cfg: schema.Config) -> dict:
    start = time.perf_counter()
    ecfg = cfg.export
    src = Path(cfg.train.out_dir)
    if not (src / "config.json").is_file():
        raise PenwrightError(f"{src}: no trained model here. Run the train stage first: `penwright train`")
    dtype = ecfg.dtype
    gguf: list[str] = list(dict.fromkeys(ecfg.gguf))  # the schema checked the choices
    quantized: list[str] = list(dict.fromkeys(ecfg.quantize))
    fix = "write the model again: rerun `penwright train`"
    model = load_model(src, fix, torch_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(src, fix)
    check_gguf(model.config, src, gguf)  # before any work: llama.cpp must be able to run what is asked for
    chat = ChatFormat.parse(getattr(tokenizer, "chat_template", None))
    if chat:
        warn(
            f"this is a chat model (persona {chat.persona!r}): it may repeat what was said in the chats it learned "
            f"from, and its chat template names {chat.persona!r} and {chat.other!r}. Read its samples before you "
            "share the exported files"
        )
    if dtype == "fp16" and quantized:
        raise ConfigError(
            f"export.quantize={quantized} quantizes the fp32 graph: it cannot be combined with export.dtype=fp16; "
            "export fp32 with export.quantize, or fp16 with export.quantize=[]"
        )
    longest = max((len(tokenizer.encode(str(p))) for p in ecfg.parity_prompts), default=0)
    if longest < 2:
        raise ConfigError(
            f"export.parity_prompts={list(ecfg.parity_prompts)}: the longest prompt must have at least "
            f"2 tokens (a prefill, then a step on its past); it has {longest}"
        )
    out = Path(ecfg.out_dir)
    with staged_dir(out) as tmp:  # a failed parity check or a crash leaves an earlier export as it was
        graph = tmp / GRAPH
        log(
            f"exporting {src} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype}) -> {out}/{GRAPH}"
        )
        kind = choose_graph(ecfg.graph, model.config)
        if kind != "transformers":
            from penwright.export.graph import build_graph

            built = build_graph(model, kind, ecfg.opset)
            external = save_graph(half(built, tmp.parent) if dtype == "fp16" else built, graph)
        elif dtype == "fp16":  # traced in fp32, then converted: tracing a half model mixes fp32 into its graph
            import onnx

            export_graph(model, graph, ecfg.opset)
            traced = onnx.load(str(graph))  # (with any external weights the exporter wrote beside it)
            for f in tmp.iterdir():
                f.unlink()
            external = save_graph(half(traced, tmp.parent), graph)
        else:
            export_graph(model, graph, ecfg.opset)
            external = save_with_external_data_if_large(graph)
        save_tokenizer(tokenizer, tmp)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        report: dict[str, Any] = {
            "graph": kind,
            "nodes": node_count(graph),
            "dtype": dtype,
            "opset": ecfg.opset,
            "external_data": external,
            "graph_mb": round(sum(p.stat().st_size for p in tmp.glob("model.onnx*")) / 1e6, 2),
        }
        prompts = [str(p) for p in ecfg.parity_prompts]
        report["parity"] = parity(model, tokenizer, tmp, prompts, ecfg.parity_new_tokens)
        tol = float(ecfg.parity_atol if dtype == "fp32" else ecfg.parity_atol_fp16)
        p = report["parity"]
        failed = [
            f"{k}={p[k]:.2e} > {tol:.0e}"
            for k in ("max_abs_diff_logits_empty_past", "max_abs_diff_logits_with_past")
            if not p[k] <= tol
        ]
        if dtype == "fp32" and not p["greedy_tokens_equal"]:
            failed.append("greedy tokens differ from transformers generate")
        report["parity"]["atol"] = tol
        report["parity"]["passed"] = not failed
        if failed:
            raise PenwrightError(f"{out}: ONNX parity failed ({'; '.join(failed)}); the export is not kept")
        for kind in quantized:
            quantize(graph, kind)
        if quantized:
            report["quantized"] = quantized_quality(model, tmp, quantized, Path(cfg.data.out_dir), cfg.train.block_size)
        if gguf:
            report["gguf"] = export_gguf(model, tmp, tmp, gguf)
        if ecfg.transformers_js:
            report["transformers_js"] = link_for_transformers_js(tmp)
        write_card(cfg, tmp, model, report, chat)
    report["seconds"] = round(time.perf_counter() - start, 2)
    path = atomic_write_text(Path(cfg.paths.reports) / "export.json", json.dumps(report, indent=2) + "\n")
    log(
        f"parity passed (max |diff| {p['max_abs_diff_logits_empty_past']:.1e} / "
        f"{p['max_abs_diff_logits_with_past']:.1e}, greedy equal: {p['greedy_tokens_equal']}) -> {out}/, {path}"
    )
    for kind in quantized:
        q = report["quantized"][kind]
        log(
            f"{out}/{q['graph']}: {q['mb']} MB, top-1 agreement with fp32 {q['top1_agreement']:.2%}, "
            f"loss {q['loss']} (fp32 {report['quantized']['fp32_loss']})"
        )
    for g in report.get("gguf", []):
        log(f"{out}/{g['file']}: {g['mb']} MB, for llama.cpp / Ollama")
    return report
