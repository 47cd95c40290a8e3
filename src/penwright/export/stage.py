"""Stage ``export``: the trained model -> one ONNX decoder graph with a KV cache, checked against PyTorch.

The graph (optimum's names, so tools that know them can read it):

* inputs: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq], ``position_ids`` [batch, seq],
  ``past_key_values.{i}.key`` / ``.value`` [batch, heads, past, head_dim] for every layer;
* outputs: ``logits`` [batch, seq, vocab] (fp32), ``present.{i}.key`` / ``.value`` [batch, heads, past+seq, head_dim].

Batch, sequence and past lengths are dynamic; the first step feeds a zero-length past, so one
graph serves prefill and decoding. Transformers 5 keeps its cache in ``DynamicCache`` objects, so
a small wrapper takes flat key/value tensors, builds the cache, and returns the flat presents.

The stage fails unless parity holds: logits vs PyTorch on a left-padded batch (real positions
only) with an empty and a non-empty past, and greedy tokens of the runtime equal to
``transformers`` ``generate(do_sample=False)``. The figures go to ``reports/export.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, GPT2LMHeadModel

from penwright.core import schema
from penwright.core.atomic import atomic_write_text, staged_dir
from penwright.core.errors import ConfigError, PenwrightError
from penwright.core.files import load_model, load_tokenizer
from penwright.core.log import get_logger
from penwright.export.gguf import BLOCK, check_gguf, export_gguf  # BLOCK: q8/q4 use q8_0's blocks
from penwright.inference.runner import position_ids_for
from penwright.prepare.tokenizer import left_padded

GRAPH = "model.onnx"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GB: bigger models keep weights beside the graph


log = get_logger("export").info


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
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    axes |= {n: {0: "batch", 2: "past"} for n in inputs[3:]}
    axes |= {n: {0: "batch", 2: "total"} for n in outputs[1:]}
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


def save_graph(model, path: Path, external: bool | None = None) -> bool:
    """Write a graph; its weights go to ``<name>.data`` beside it past protobuf's 2 GB limit (or as ``external``
    says). Returns whether they did."""
    import onnx

    if external is None:
        external = sum(t.ByteSize() for t in model.graph.initializer) >= EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    return external


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def half(graph, scratch: Path):
    """``export.dtype=fp16``: the fp32 graph with its weights, activations, keys and values in fp16 and its logits
    kept fp32 (onnxruntime's own float16 converter, which leaves the ops fp16 cannot run safely in fp32). Past
    protobuf's 2 GB (gpt2-large and up) the converter's shape inference cannot take the graph in memory: it runs
    on the graph saved in ``scratch`` with external weights instead."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if sum(t.ByteSize() for t in graph.graph.initializer) < EXTERNAL_DATA_BYTES:
        return convert_float_to_float16(graph, keep_io_types=["logits"])
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        fp32, typed = Path(tmp) / "fp32.onnx", Path(tmp) / "typed.onnx"
        save_graph(graph, fp32, external=True)
        onnx.shape_inference.infer_shapes_path(str(fp32), str(typed))
        graph = onnx.load(str(typed))  # (its weights read into memory from fp32.onnx.data)
    return convert_float_to_float16(graph, keep_io_types=["logits"], disable_shape_infer=True)


def save_with_external_data_if_large(path: Path) -> bool:
    """Re-save ``path`` with its weights in ``model.onnx.data`` when the graph passes protobuf's 2 GB."""
    import onnx

    if path.stat().st_size < EXTERNAL_DATA_BYTES:
        return False
    return save_graph(onnx.load(str(path)), path, external=True)


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


# -- parity -------------------------------------------------------------------------------------------


def parity(model: GPT2LMHeadModel, tokenizer, onnx_dir: Path, prompts: list[str], new_tokens: int) -> dict:
    """ONNX vs PyTorch: logits on real positions (past 0 and > 0), greedy tokens vs transformers generate."""
    from penwright.inference.engine import Engine

    runner = graph_runner(onnx_dir, GRAPH)
    tokenizer = left_padded(tokenizer)
    enc = tokenizer(prompts, return_tensors="np", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    split = max(1, ids.shape[1] // 2)  # the first half is the prefill, the second half runs on its past

    with torch.no_grad():
        full = (
            model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(position_ids_for(mask, ids.shape[1])),
            )
            .logits.float()
            .numpy()
        )
    positions = position_ids_for(mask, ids.shape[1])
    first, present = runner.forward(ids[:, :split], mask[:, :split], positions[:, :split], None)
    second, _ = runner.forward(ids[:, split:], mask, positions[:, split:], present)
    real = mask.astype(bool)
    diff_empty = float(np.abs(first - full[:, :split])[real[:, :split]].max())
    diff_past = float(np.abs(second - full[:, split:])[real[:, split:]].max())

    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )[:, ids.shape[1] :].numpy()
    engine = Engine.load(onnx_dir, slots=len(prompts))  # the engine generate and serve run: prompts unpadded
    prompt_ids = [row[m == 1].tolist() for row, m in zip(ids, mask)]
    ours = engine.generate_ids(prompt_ids, new_tokens, do_sample=False, stop_at_eos=False)
    return {
        "max_abs_diff_logits_empty_past": diff_empty,
        "max_abs_diff_logits_with_past": diff_past,
        "greedy_tokens_equal": bool(np.array_equal(ours, ref)),
        "greedy_tokens_compared": int(ref.size),
        "batch": len(prompts),
        "left_padded_rows": int((mask[:, 0] == 0).sum()),
        "provider": engine.provider,
    }


# -- the stage ----------------------------------------------------------------------------------------


def export(cfg: schema.Config) -> dict:
    start = time.perf_counter()
    ecfg = cfg.export
    src = Path(cfg.train.out_dir)
    if not (src / "config.json").is_file():
        raise PenwrightError(f"{src}: no trained model here. Run the train stage first: `penwright train`")
    dtype = ecfg.dtype
    gguf = list(dict.fromkeys(ecfg.gguf))  # the schema checked the choices
    quantized = list(dict.fromkeys(ecfg.quantize))
    fix = "write the model again: rerun `penwright train`"
    model = load_model(src, fix, torch_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(src, fix)
    check_gguf(model.config, src, gguf)  # before any work: llama.cpp must be able to run what is asked for
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
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        report = {
            "graph": kind,
            "nodes": _node_count(graph),
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


def graph_runner(onnx_dir: Path, graph: str):
    """The exported graph as it is (no rewrite), on the CPU: one forward pass at a time (``PaddedRunner.forward``)."""
    from penwright.inference.runner import PaddedRunner, open_session, read_beside_graph

    session, _ = open_session(str(onnx_dir / graph), onnx_dir / graph)
    config, tokenizer = read_beside_graph(onnx_dir, session)
    n = int(config["n_positions"])
    return PaddedRunner(session, config, slots=1, context=n, eos=int(tokenizer.eos_token_id))


def graph_logits(onnx_dir: Path, graph: str, ids: np.ndarray) -> np.ndarray:
    """The logits [windows, block, vocab] of one graph on unpadded windows (a single prefill)."""
    mask = np.ones_like(ids)
    return graph_runner(onnx_dir, graph).forward(ids, mask, position_ids_for(mask, ids.shape[1]), None)[0]


def mean_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return round(float(-np.take_along_axis(logp, targets[..., None], -1).mean()), 5)


def quantized_quality(
    model: GPT2LMHeadModel, onnx_dir: Path, kinds: list[str], prepared: Path, block: int, windows: int = 8
) -> dict:
    """Each quantized graph against fp32 on validation windows: its loss, its size, and how often its top-1
    next token equals fp32's (every position of every window)."""
    batch = validation_windows(prepared, min(block, model.config.n_positions - 1), windows)
    ids, targets = batch[:, :-1], batch[:, 1:]
    logits = graph_logits(onnx_dir, GRAPH, ids)
    top1 = logits.argmax(-1)
    result = {
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
