"""The model for llama.cpp and Ollama: ``export.gguf`` writes ``model.<type>.gguf`` beside the ONNX graph.

GGUF is llama.cpp's file: metadata (architecture ``gpt2``, sizes, the tokenizer) and tensors, written
here with the ``gguf`` package that llama.cpp maintains, whose own table maps transformers' tensor
names to llama.cpp's. Types:

* ``f32``: the weights as trained (llama.cpp's greedy tokens equal transformers' on it; tested);
* ``f16``: half the size;
* ``q8_0``: llama.cpp's 8-bit blocks (one fp16 scale per 32 weights), a quarter of fp32;
* ``q4_0``: 4-bit blocks, an eighth.

Quantized files quantize the matrices (token embedding, attention, MLP, output); norms, biases and
the position embedding stay fp32, as llama.cpp's own converter keeps them.

The tokenizer goes in whole (tokens, merges, special tokens), marked with GPT-2's pre-tokenizer
(``gpt-2``): pretrained GPT-2's and penwright's own byte-level BPE both split text with GPT-2's
regex, so llama.cpp tokenizes as the ``tokenizers`` library does (tested on spaces, newlines,
emoji and non-Latin scripts). Anything llama.cpp could not reproduce is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from penwright.core.chat_format import ChatFormat
from penwright.core.errors import ConfigError, PenwrightError

TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # weights per block of q8_0 and q4_0: a quantized matrix's rows must be a multiple of it


def gguf_name(qtype: str) -> str:
    return f"model.{qtype}.gguf"


def why_not(config, tokenizer_json: dict, types: list[str]) -> str | None:
    """Why llama.cpp's ``gpt2`` architecture (or its tokenizer) cannot express this model (None: it can)."""
    from penwright.export.graph import supported

    why = supported(config)  # llama.cpp's gpt2 is the same math as penwright's graphs: tanh GELU, 1/sqrt(d) scale
    if why:
        return why
    if config.n_embd % config.n_head:
        return f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}"
    inner = config.n_inner or 4 * config.n_embd
    if any(t.startswith("q") for t in types) and (config.n_embd % BLOCK or inner % BLOCK):
        return (
            f"q8_0/q4_0 quantize blocks of {BLOCK} weights, and n_embd={config.n_embd} or the MLP width "
            f"{inner} is not a multiple of {BLOCK}: use f16 or f32"
        )
    why = _why_not_tokenizer(tokenizer_json)
    if why:
        return why
    top = max(_vocab(tokenizer_json).values(), default=-1)
    if top >= config.vocab_size:
        return (
            f"its tokenizer has ids up to {top} but the model's vocabulary is {config.vocab_size}: "
            "they come from different models"
        )
    eos = eos_id(config, tokenizer_json)
    if eos is None:
        return "it has no end-of-text token (no eos_token_id in config.json, no <|endoftext|> in the tokenizer)"
    if eos not in _vocab(tokenizer_json).values():
        return f"its end-of-text id {eos} (config.json eos_token_id) is not a token of its tokenizer"
    return None


def _vocab(tokenizer_json: dict) -> dict[str, int]:
    """Every token's id: the BPE vocabulary and the added tokens."""
    return {
        **tokenizer_json["model"].get("vocab", {}),
        **{t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])},
    }


def eos_id(config, tokenizer_json: dict) -> int | None:
    """The end-of-text id: the model config's, else the tokenizer's ``<|endoftext|>``."""
    if config.eos_token_id is not None:
        return int(config.eos_token_id)
    return _vocab(tokenizer_json).get("<|endoftext|>")


def _why_not_tokenizer(tok: dict) -> str | None:
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        return "its tokenizer is not a plain byte-level BPE (llama.cpp's gpt2 tokenizer is)"
    if model.get("dropout"):
        return f"its BPE drops merges at random (dropout={model['dropout']}), which llama.cpp does not"
    for added in tok.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            return f"its added token {added['content']!r} strips spaces or matches whole words only, which llama.cpp does not"
    if tok.get("normalizer"):
        return f"its tokenizer normalizes text first ({tok['normalizer'].get('type')}), which llama.cpp's gpt2 does not"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if (
        len(steps) != 1
        or steps[0].get("type") != "ByteLevel"
        or not steps[0].get("use_regex", True)
        or steps[0].get("add_prefix_space")
    ):
        return "its pre-tokenizer is not GPT-2's (ByteLevel with GPT-2's regex, no prefix space)"
    return None


def tokenizer_metadata(tok: dict, vocab_size: int) -> dict:
    """Tokens (by id), their types and the merges, from a ``tokenizer.json``; ids past the tokenizer's
    vocabulary (a model padded to a rounder size) become unused placeholders."""
    from gguf import TokenType

    vocab = _vocab(tok)
    added_ids = {t["id"] for t in tok.get("added_tokens", [])}
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * size
    for piece, i in vocab.items():
        tokens[i] = piece
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types.append(TokenType.UNUSED)
        else:
            # special tokens are control tokens; other added tokens are matched whole in the text, as transformers does
            types.append(
                TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added_ids else TokenType.NORMAL
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(
    model, tokenizer_json: dict, path: Path, qtype: str, chat_template: str | None = None, name: str = "penwright"
) -> dict:
    """``model`` (a GPT2LMHeadModel) and its tokenizer (and chat template) as one GGUF file of type ``qtype``."""
    import gguf

    cfg = model.config
    qtypes = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }
    ftypes = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
    vocab = tokenizer_metadata(tokenizer_json, cfg.vocab_size)
    eos = eos_id(cfg, tokenizer_json)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_file_type(ftypes[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(cfg.bos_token_id if cfg.bos_token_id is not None else eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)  # GPT-2 starts from the text itself
    if chat_template:
        writer.add_chat_template(chat_template)  # tokenizer.chat_template: llama-server --jinja renders it

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tied = "lm_head.weight" not in state or np.array_equal(state["lm_head.weight"], state["transformer.wte.weight"])
    written = 0
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or (key == "lm_head.weight" and tied):
            continue  # the causal mask buffers; a tied output matrix (llama.cpp reuses token_embd)
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise PenwrightError(f"{path}: llama.cpp's gpt2 has no tensor for {key}")
        if value.ndim == 2 and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.T  # transformers' Conv1D keeps [in, out]; llama.cpp wants rows of inputs: [out, in]
        value = np.ascontiguousarray(value, dtype=np.float32)
        matrix = value.ndim == 2 and not key.endswith("wpe.weight")  # llama.cpp keeps positions in fp32 too
        if qtype == "f32" or not matrix:
            writer.add_tensor(target, value)
        elif qtype == "f16":
            writer.add_tensor(target, value.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(value, qtypes[qtype]), raw_dtype=qtypes[qtype])
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "type": qtype, "tensors": written, "mb": round(path.stat().st_size / 1e6, 2)}


def check_gguf(config, tokenizer_dir: Path, types: list[str]) -> dict:
    """The tokenizer.json beside the model, or a ConfigError when llama.cpp cannot run this model (or its
    tokenizer) as ``types``."""
    if not types:
        return {}
    tokenizer_json = read_tokenizer_json(tokenizer_dir)
    why = why_not(config, tokenizer_json, types)
    if why:
        raise ConfigError(
            f"export.gguf={types}: llama.cpp cannot run this model ({why}); set export.gguf=[] to export ONNX only"
        )
    return tokenizer_json


def export_gguf(model, tokenizer_dir: Path, out_dir: Path, types: list[str]) -> list[dict]:
    """One ``model.<type>.gguf`` per type in ``out_dir``, and an Ollama ``Modelfile`` for the first; refuses
    (before writing) what llama.cpp cannot run."""
    if not types:
        return []
    tokenizer_json = check_gguf(model.config, tokenizer_dir, types)
    template = chat_template_of(tokenizer_dir)
    written = [
        write_gguf(model, tokenizer_json, out_dir / gguf_name(t), t, template) for t in types
    ]  # same bytes each time
    eos = eos_id(model.config, tokenizer_json)
    assert eos is not None  # check_gguf refuses a model without one
    eos_text = {i: t for t, i in _vocab(tokenizer_json).items()}[eos]
    write_modelfile(out_dir / "Modelfile", gguf_name(types[0]), eos_text, ChatFormat.parse(template))
    return written


def chat_template_of(tokenizer_dir: Path) -> str | None:
    """The ``chat_template`` saved inline in ``tokenizer_config.json`` (a chat model's), else None."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def write_modelfile(path: Path, gguf_file: str, eos: str, chat: ChatFormat | None = None) -> None:
    """An Ollama Modelfile beside the GGUF; ``ollama create <name> -f Modelfile`` in that folder. A chat model's
    TEMPLATE is its chat template in Go's syntax (``ChatFormat.ollama_template``); any other model takes the
    prompt as plain text. Generation stops at the end-of-text token (the end of the persona's turn)."""
    template = chat.ollama_template() if chat else "{{ .Prompt }}"
    usage = "ollama run <name>   (then talk)" if chat else 'ollama run <name> "Your prompt"'
    path.write_text(
        f"# ollama create <name> -f Modelfile   (in this folder), then: {usage}\n"
        f"FROM ./{gguf_file}\n"
        f'TEMPLATE """{template}"""\n'
        f'PARAMETER stop "{eos}"\n'
        "PARAMETER temperature 0.8\n",
        encoding="utf-8",
    )


def read_tokenizer_json(tokenizer_dir: Path) -> dict:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise PenwrightError(f"{path}: missing; GGUF needs the fast tokenizer's tokenizer.json beside the model")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PenwrightError(f"{path}: unreadable ({e}); re-run `penwright train` or copy the tokenizer again") from e


def load_llama(path: Path, *, repack: bool = True, **kwargs):
    """llama.cpp (llama-cpp-python) on a GGUF file. ``repack=False`` keeps the weights in the file's own
    layout (llama.cpp's ``--no-repack``): a native build uses ggml's AMX kernels for q8_0/q4_0 on CPUs
    that have AMX, and those crashed here (SIGSEGV in ggml_backend_amx_mul_mat)."""
    try:
        import llama_cpp
        import llama_cpp.llama as module
    except ImportError as e:
        raise PenwrightError(
            f"llama-cpp-python is not installed ({e}); install it (it compiles llama.cpp: minutes): "
            "pip install -c constraints.txt -e '.[llama]'"
        ) from None
    kwargs.setdefault("verbose", False)
    if repack:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    default = module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        module.llama_cpp.llama_model_default_params = default
