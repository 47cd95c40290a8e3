"""The export folder as a Hugging Face Hub model repository: a model card (``README.md``) and transformers.js's
layout (``onnx/model.onnx``).

The card's YAML metadata is the Hub's (license, library_name, pipeline_tag, base_model, tags) plus a
``penwright`` block: the training data's hash, val loss and bits per byte, the best step. Its text says what the
model is, what it was trained on (the corpus's name, size and hash, never its text), how good it is, a few samples
with their copy measures, and how to run it in transformers, onnxruntime, transformers.js, llama.cpp and Ollama.
A chat model's card has no samples unless ``export.card_samples`` asks for them, and says the model may repeat
its chats. Uploading is the official ``hf upload``; nothing here talks to the Hub.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from penwright.core import schema
from penwright.core.chat_format import ChatFormat
from penwright.core.log import get_logger

log = get_logger("export").info

TRANSFORMERS_JS = {
    "model.onnx": "model.onnx",
    "model.q8.onnx": "model_quantized.onnx",
    "model.q4.onnx": "model_q4.onnx",
}


def link_for_transformers_js(folder: Path) -> list[str]:
    """``onnx/<name>``: the graphs where transformers.js looks for them (``dtype`` fp32, q8, q4, int8), hard
    links (a copy where the filesystem has none), so the folder loads as it is, locally or from the Hub."""
    (folder / "onnx").mkdir(exist_ok=True)
    written = []
    for ours, theirs in TRANSFORMERS_JS.items():
        if not (folder / ours).is_file() or (folder / f"{ours}.data").exists():
            continue  # (a graph with external data: transformers.js reads no such graph from one file)
        target = folder / "onnx" / theirs
        try:
            os.link(folder / ours, target)
        except OSError:
            shutil.copyfile(folder / ours, target)
        written.append(f"onnx/{theirs}")
    return written


def card_samples(cfg: schema.Config, folder: Path, chat: ChatFormat | None) -> list[dict]:
    """A few samples of the exported graph (``sample.prompts`` at ``sample.temperatures``' middle, seeded), with
    their copy measures where the prepared folder has a copy index; none for a chat model unless asked."""
    wanted = cfg.export.card_samples
    count = wanted if wanted is not None else (0 if chat else 3)
    if count == 0:
        return []
    from penwright.core.copy_index import Copies
    from penwright.inference.engine import Engine
    from penwright.inference.sampling import SamplingConfig

    s = cfg.sample
    temps = sorted(s.temperatures) or [0.8]
    sampling = SamplingConfig(temperature=temps[len(temps) // 2], top_k=s.top_k, top_p=s.top_p)
    prompts = (list(s.prompts) or [""]) * count
    engine = Engine.load(folder, slots=count)
    copies = Copies.open(cfg.data.out_dir, engine.tokenizer, s.copy_min_span) if s.copy_min_span else None
    longest = max(len(engine.encode(p)) for p in prompts[:count])
    texts = engine.generate(
        prompts[:count], max(1, min(s.max_new_tokens, engine.context - longest)), sampling=sampling, seed=s.seed
    )
    out = []
    for prompt, text in zip(prompts, texts):
        sample = {"prompt": prompt, "text": text, "temperature": sampling.temperature}
        if copies is not None:
            sample["copies"] = copies.measure(text).as_dict()
        out.append(sample)
    return out


def write_card(cfg: schema.Config, folder: Path, model, report: dict, chat: ChatFormat | None) -> None:
    """``folder/README.md``: the model card of ``model`` (the PyTorch model the export was made from)."""
    model_config = model.config
    train = _json(Path(cfg.paths.reports) / "train.json")
    meta = _json(Path(cfg.data.out_dir) / "meta.json")
    data = meta.get("data", {})
    name = cfg.export.card_name or card_name(cfg.data.path)
    base = cfg.model.name_or_path
    base = base if base and not Path(base).exists() else None  # a hub name, not a local folder
    params = model.num_parameters()
    numbers = {
        "data_md5": data.get("md5"),
        "val_loss": train.get("best_val_loss", train.get("val_loss")),
        "val_bpb": train.get("best_val_bpb", train.get("val_bpb")),
        "best_step": train.get("best_step"),
        "steps": train.get("steps"),
    }
    metadata = {
        "license": cfg.export.card_license,
        "library_name": "transformers.js",
        "pipeline_tag": "text-generation",
        **({"base_model": base} if base else {}),
        "tags": ["gpt2", "onnx", "gguf", "penwright", *(["chat"] if chat else [])],
        "penwright": numbers,
    }
    samples = card_samples(cfg, folder, chat)
    q = report.get("quantized", {})
    lines = [
        "---",
        _yaml(metadata).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        (
            f"A GPT-2 ({model_config.n_layer} layers, {model_config.n_head} heads, width {model_config.n_embd}, "
            f"context {model_config.n_positions} tokens, {f'{params / 1e6:.1f}M' if params >= 1e6 else f'{params:,}'} parameters) "
            + (f"finetuned from `{base}`" if base else "trained from scratch")
            + " with penwright (reproducible GPT-2 finetuning)."
        ),
        "",
        "## Training data",
        "",
        (
            f"`{data.get('path', '?')}`: {data.get('documents', '?')} documents, {data.get('bytes', 0) / 1e6:.2f} MB "
            f"(md5 `{data.get('md5', '?')}`); {meta.get('val', {}).get('documents', '?')} held out for validation."
            if data
            else "(no prepared corpus was beside the export: the data is not described)"
        ),
        "",
    ]
    t = cfg.train
    if train:
        lines += [
            "## Training",
            "",
            f"{train.get('steps', '?')} steps ({train.get('tokens', 0):,} tokens) on {train.get('device', '?')}: "
            f"micro-batch {train.get('micro_batch', '?')} x {train.get('accumulate_grad_batches', 1)}, block "
            f"{t.block_size} tokens, AdamW at lr {t.lr:g} ({t.schedule}, {t.warmup_steps} warmup steps), weight "
            f"decay {t.weight_decay:g}" + (f", LoRA rank {t.lora.rank}" if t.lora.enabled else "") + ".",
            "",
        ]
    if chat:
        lines += [
            f"**A chat model**: it talks as {chat.persona!r}, from chat exports. It may repeat what was said in "
            "them: read what it writes before you share it.",
            "",
        ]
    lines += ["## Quality", ""]
    if train:
        lines += [
            "| val loss (nats/token) | val bits per byte | best step | steps |",
            "|---|---|---|---|",
            f"| {numbers['val_loss']} | {numbers['val_bpb']} | "
            f"{train.get('best_step', '?')} | {train.get('steps', '?')} |",
            "",
        ]
    for kind, info in q.items():
        if isinstance(info, dict):
            lines.append(
                f"- `{info['graph']}` ({kind}, {info['mb']} MB): top-1 agreement with fp32 {info['top1_agreement']:.2%}, "
                f"val loss {info['loss']} (fp32 {q['fp32_loss']})"
            )
    if q:
        lines.append("")
    if samples:
        lines += ["## Samples", ""]
        for s in samples:
            c = s.get("copies")
            copied = (
                f" · longest span copied from the training text: {c['longest']} tokens; "
                f"{c['copied_share']:.0%} in copied spans of {c['min_span']}+ tokens"
                if c
                else ""
            )
            lines += [
                f"Prompt {s['prompt']!r}, temperature {s['temperature']}{copied}:",
                "",
                "```text",
                s["prompt"] + s["text"],
                "```",
                "",
            ]
    lines += _how_to_run(name, folder)
    (folder / "README.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    log(f"{folder}/README.md: the model card ({len(samples)} samples); publish the folder with `hf upload`")


def card_name(data_path: str) -> str:
    """A name for the model from its corpus's path: ``data/kjv/books`` -> ``kjv-books``."""
    parts = [p for p in Path(data_path).with_suffix("").parts if p not in ("data", ".", "..", "/")]
    return "-".join(parts[-2:]) or "penwright-model"


def _how_to_run(name: str, folder: Path) -> list[str]:
    gguf = sorted(p.name for p in folder.glob("*.gguf"))
    repo = f"<you>/{name}"
    out = [
        "## Run it",
        "",
        f"Publish this folder: `hf upload {repo} .` (the official Hugging Face CLI; `hf auth login` first).",
        "",
        "**penwright** (onnxruntime, KV cache): `penwright generate generate.model_dir=.` or `penwright serve "
        "serve.model_dir=.` (an OpenAI-compatible API and a page).",
        "",
        "**onnxruntime**: `model.onnx` takes `input_ids`, `attention_mask`, `position_ids` and "
        "`past_key_values.{i}.key/value` ([batch_size, heads, past, head_dim]; empty for the first step) and returns "
        "`logits` and `present.{i}.key/value`, optimum's names.",
        "",
        "**transformers.js** (browser or Node):",
        "",
        "```js",
        'import { pipeline } from "@huggingface/transformers";',
        f'const generate = await pipeline("text-generation", "{repo}", {{ dtype: "fp32" }});  // or "q8"',
        'console.log(await generate("And it came to pass", { max_new_tokens: 64, do_sample: true, temperature: 0.8 }));',
        "```",
        "",
        "**transformers** (PyTorch) reads the trained weights, which penwright keeps beside the export "
        '(`artifacts/model`): `AutoModelForCausalLM.from_pretrained("artifacts/model")`.',
        "",
    ]
    if gguf:
        out += [
            f'**llama.cpp**: `llama-cli -m {gguf[0]} -p "And it came to pass" -n 64`',
            "",
            "**Ollama**: `ollama create "
            + name.lower()
            + " -f Modelfile`, then `ollama run "
            + name.lower()
            + ' "And it came to pass"`',
            "",
        ]
    return out


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
