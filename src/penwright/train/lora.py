"""LoRA finetuning (``train.lora``): low-rank adapters on GPT-2's attention and MLP matrices, built with peft.

The train stage calls ``apply`` on the model it built: the base weights are frozen and only the adapters
train, so the optimizer state and the checkpoints hold the adapters alone (``trainable_only``). At the end
``save`` writes two things into ``train.out_dir``: the adapter as peft writes it (``adapter/``, loadable
with ``PeftModel.from_pretrained``) and the adapter merged into the weights, a plain Hugging Face model
that export, generate, serve and verbosify read exactly as they read a full finetune.

A resumed LoRA run must sit on the same base weights: ``base_digest`` (a hash of every base tensor) goes
into the checkpoint fingerprint and into ``adapter/penwright.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from penwright.core import schema
from penwright.core.atomic import atomic_write_text
from penwright.core.errors import ConfigError

# train.lora.targets -> the module-name suffix peft matches (``transformer.h.N.<suffix>``)
MODULES = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
INFO = "penwright.json"  # beside peft's files in adapter/: the base the adapter was trained on


def base_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the (base) model's state, in name order: equal only for equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapted_layers(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Module]:
    """{module name: module} of every matrix an adapter goes on."""
    suffixes = tuple("." + MODULES[t] for t in targets)
    return {name: m for name, m in model.named_modules() if name.endswith(suffixes) and hasattr(m, "weight")}


def check(model: torch.nn.Module, cfg: schema.Lora, source: str) -> None:
    """The model has every targeted layer, and the rank fits each of them."""
    layers = adapted_layers(model, list(cfg.targets))
    missing = [t for t in cfg.targets if not any(name.endswith("." + MODULES[t]) for name in layers)]
    if getattr(model.config, "model_type", None) != "gpt2" or missing:
        raise ConfigError(
            f"train.lora.targets={list(cfg.targets)}: the model ({source}, type "
            f"{getattr(model.config, 'model_type', '?')}) has no {', '.join(missing) or 'GPT-2'} layers; LoRA here "
            f"adapts GPT-2's {', '.join(MODULES)} (set train.lora.enabled=false for a full finetune)"
        )
    name, layer = min(layers.items(), key=lambda kv: min(kv[1].weight.shape))
    smallest = min(layer.weight.shape)
    if cfg.rank > smallest:
        raise ConfigError(
            f"train.lora.rank={cfg.rank}: larger than the layer {name} ({' x '.join(map(str, layer.weight.shape))}); "
            f"use train.lora.rank={smallest} or less"
        )


def apply(model, cfg: schema.Lora, *, source: str, gradient_checkpointing: bool):
    """``model`` with LoRA adapters (a peft ``PeftModel``; the base frozen). ``source`` names the base for the
    adapter's config (``model.name_or_path``)."""
    from peft import LoraConfig, get_peft_model

    check(model, cfg, source)
    digest = base_digest(model)
    if gradient_checkpointing:  # checkpointed blocks need an input that requires grad, or the adapters get none
        model.enable_input_require_grads()
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=[MODULES[t] for t in cfg.targets],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight as (in, out)
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=source,
    )
    peft_model = get_peft_model(model, config)
    peft_model.penwright_base_digest = digest
    if cfg.adapter:
        load_adapter(peft_model, Path(cfg.adapter), cfg, digest)
    return peft_model


def load_adapter(peft_model, folder: Path, cfg: schema.Lora, digest: str) -> None:
    """Start from the weights of an adapter folder (peft's files): same rank, alpha and targets, same base."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"train.lora.adapter={folder}: no adapter_config.json there; give a folder peft wrote "
            f"(an earlier run's <train.out_dir>/adapter)"
        )
    saved = json.loads(config_file.read_text())
    wanted = {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": sorted(MODULES[t] for t in cfg.targets)}
    keys = {"r": "rank", "lora_alpha": "alpha", "target_modules": "targets"}
    for key, value in wanted.items():
        have = sorted(saved.get(key) or []) if key == "target_modules" else saved.get(key)
        same_alpha = key == "lora_alpha" and isinstance(have, int | float) and float(have) == float(cfg.alpha)
        if have != value and not same_alpha:
            raise ConfigError(
                f"train.lora.{keys[key]}: {config_file} was trained with {key}={have!r}, this run asks for "
                f"{value!r}; set train.lora.{keys[key]} to match the adapter"
            )
    info_file = folder / INFO
    if info_file.is_file() and json.loads(info_file.read_text()).get("base_digest") != digest:
        raise ConfigError(
            f"train.lora.adapter={folder}: this adapter was trained on another base model "
            f"({json.loads(info_file.read_text()).get('base')!r}, other weights) than model.name_or_path gives; "
            f"point model.name_or_path at the adapter's base"
        )
    try:
        result = set_peft_model_state_dict(peft_model, load_peft_weights(str(folder), device="cpu"))
    except RuntimeError as err:  # size mismatch: an adapter of another model shape
        raise ConfigError(
            f"train.lora.adapter={folder}: its weights do not fit this model ({' '.join(str(err).split())[:200]}); "
            f"point model.name_or_path at the adapter's base"
        ) from None
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(
            f"train.lora.adapter={folder}: weights for layers this model lacks ({result.unexpected_keys[0]}, ...); "
            f"point model.name_or_path at the adapter's base"
        )


def save(peft_model, out: Path) -> dict:
    """Write ``out/adapter/`` (peft's adapter files + the base it needs) and the merged model into ``out``.
    Merging happens in place: call it last. Returns the sizes written, in bytes."""
    adapter = out / "adapter"
    peft_model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    atomic_write_text(
        adapter / INFO,
        json.dumps({"base": config.get("base_model_name_or_path"), "base_digest": peft_model.penwright_base_digest})
        + "\n",
    )
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out)
    return {
        "adapter_bytes": sum(p.stat().st_size for p in adapter.iterdir()),
        "merged_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    }


def trainable_only(module: torch.nn.Module, state_dict: dict) -> dict:
    """The entries of a module's ``state_dict`` that train (the adapters): what a LoRA checkpoint keeps."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable}
