"""The typed schema of the composed config: each knob's type and allowed range or choices, in one place.

The defaults and the comment on each knob live in ``conf/`` (stated once, there); this module
says what a value may be. ``config.compose`` validates the composed YAML against ``Config`` before
any stage runs, so a wrong type or an out-of-range value anywhere is refused up front, in one
line naming the key, the value and what is allowed. Stages receive these typed, frozen objects
(``cfg.train.lr`` is a float), never raw ``DictConfig`` values to cast.

Why pydantic and not Hydra structured configs: ``dvc exp run`` composes ``conf/`` in DVC's own
process, where a ConfigStore registered by penwright does not exist; validating the composed
result works the same whichever process composed it.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# -- value types -------------------------------------------------------------------------------------

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy and torch seeds are 32-bit
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Ratio = Annotated[float, Field(ge=0, le=1)]  # [0, 1]
TopP = Annotated[float, Field(gt=0, le=1)]  # (0, 1]; 1.0 = off
Temperature = Annotated[float, Field(gt=0, le=100)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
Threads = Annotated[int, Field(ge=0, le=1024)]  # 0: all cores


class Group(BaseModel):
    """A config group: every key known (a typo is an error), types strict (``"1"`` is not 1), frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _as_yaml_means(cls, values):
        """What YAML and Hydra overrides write, read as meant: a number where text is expected is that text
        (``serve.api_key=123456``, ``generate.prompts=[1984]``: Hydra parses them as ints), and null
        where a list is expected is an empty list (``generate.stop=null``)."""
        if not isinstance(values, dict):
            return values
        out = dict(values)
        for name, info in cls.model_fields.items():
            if name not in out:
                continue
            value, kind = out[name], _text_or_list(info.annotation)
            if kind in ("list", "list[str]") and value is None:
                out[name] = []
            elif kind == "str" and _is_number(value):
                out[name] = str(value)
            elif kind == "list[str]" and isinstance(value, list):
                out[name] = [str(v) if _is_number(v) else v for v in value]
        return out

    def to_dict(self) -> dict:
        """The values as composed (keys a group's YAML leaves out stay out)."""
        return self.model_dump(exclude_unset=True)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text_or_list(annotation) -> str | None:
    """``str`` for a text field (``str``, ``str | None``), ``list[str]``, ``list`` (any other list), else None."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else ()
    members = [a for a in args if a is not type(None)] or [annotation]
    if len(members) != 1:
        return None
    arg = members[0]
    if typing.get_origin(arg) is Annotated:
        arg = typing.get_args(arg)[0]
    if arg is str:
        return "str"
    if typing.get_origin(arg) is list:
        inner = typing.get_args(arg)[0]
        inner = typing.get_args(inner)[0] if typing.get_origin(inner) is Annotated else inner
        return "list[str]" if inner is str else "list"
    return None


# -- groups ------------------------------------------------------------------------------------------


class Paths(Group):
    artifacts: str
    reports: str


class ChatData(Group):
    speaker: str | None  # null: the format's own (sms: "me", messages: "assistant")
    gap_hours: PosFloat
    merge_turns: bool
    scrub: bool
    loss_on: Literal["persona", "all"]
    openings: NonNegInt


CHAT_FORMATS = ("whatsapp", "telegram", "messages", "sms")


class Data(Group):
    path: str
    glob: str
    format: Literal["auto", "text", "csv", "jsonl", "whatsapp", "telegram", "messages", "sms"]
    csv_column: str | None
    csv_prefix: str | None  # null: none
    jsonl_field: str
    take: str | None
    encoding_errors: Literal["strict", "replace"]
    val_fraction: Annotated[float, Field(ge=0, lt=1)]
    split_seed: Seed
    chunk_bytes: Annotated[int, Field(ge=4096, le=2**31 - 1)]
    out_dir: str
    fast_encode: bool
    copy_index: bool
    copy_index_max_gib: PosFloat
    chat: ChatData

    @field_validator("take")
    @classmethod
    def _one_group(cls, take: str | None) -> str | None:
        if take is None:
            return take
        try:
            groups = re.compile(take).groups
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        if groups != 1:
            raise ValueError(f"the regex has {groups} groups; give exactly one (group): the part of each row to keep")
        return take


class Tokenizer(Group):
    type: Literal["bpe", "bytes", "pretrained"]
    name_or_path: str | None
    vocab_size: Annotated[int, Field(ge=258, le=2**31 - 1)] | None = None  # bpe: 256 bytes + 2 special tokens at least
    min_frequency: PosInt | None = None
    train_max_bytes: PosInt | None = None


class Model(Group):
    name_or_path: str | None
    n_layer: Annotated[int, Field(ge=1, le=1024)] | None = None  # from scratch only (a pretrained model has its own)
    n_head: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_embd: Annotated[int, Field(ge=1, le=65536)] | None = None
    n_positions: Annotated[int, Field(ge=2, le=1 << 20)] | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    activation: Literal["gelu_new", "gelu_pytorch_tanh"] | None = None  # GELU's tanh form, as 5 ops or one
    tokenizer: Tokenizer

    @model_validator(mode="after")
    def _sizes(self) -> Model:
        if self.name_or_path is None:
            for key in ("n_layer", "n_head", "n_embd", "n_positions"):
                if getattr(self, key) is None:
                    raise _KeyError(f"model.{key}", None, "a from-scratch model (model.name_or_path=null) needs a size")
            if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
                raise _KeyError("model.n_embd", self.n_embd, f"not divisible by model.n_head={self.n_head}")
        if self.tokenizer.type == "pretrained" and not self.tokenizer.name_or_path:
            raise _KeyError(
                "model.tokenizer.name_or_path",
                None,
                "tokenizer type pretrained needs a hub name or local dir (or type bpe / bytes)",
            )
        if self.tokenizer.type == "bpe":
            for key in ("vocab_size", "min_frequency", "train_max_bytes"):
                if getattr(self.tokenizer, key) is None:
                    raise _KeyError(f"model.tokenizer.{key}", None, "a bpe tokenizer needs it")
        return self


class Fsdp(Group):
    sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"]
    activation_checkpointing: bool
    cpu_offload: bool


# Lightning's precision values (and their short aliases), and the strategies penwright knows without asking
# Lightning's registry (any other name is checked against it: deepspeed, ...).
PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "64",
    "bf16",
)
STRATEGIES = (
    "auto",
    "ddp",
    "ddp_spawn",
    "ddp_fork",
    "ddp_notebook",
    "ddp_find_unused_parameters_true",
    "ddp_find_unused_parameters_false",
    "fsdp",
    "single_device",
)


class Trainer(Group):
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "tpu", "auto"]
    devices: int | str | list[int]  # how many (-1: all), which ("0,1" or [0, 1]), or auto
    num_nodes: Annotated[int, Field(ge=1, le=100_000)]
    strategy: str  # one of STRATEGIES, or any strategy registered with Lightning
    precision: str  # one of PRECISIONS
    max_steps: PosInt
    accumulate_grad_batches: Annotated[int, Field(ge=1, le=65536)]
    log_every_n_steps: PosInt
    progress_bar: bool
    fsdp: Fsdp | None = None  # trainer=fsdp only

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value):
        ok = (
            (_is_number(value) and isinstance(value, int) and (value == -1 or 1 <= value <= 4096))
            or value == "auto"
            or (isinstance(value, str) and re.fullmatch(r"-1|\d+(,\d+)*,?", value.strip()) is not None)
            or (
                isinstance(value, list)
                and value
                and all(_is_number(v) and isinstance(v, int) and v >= 0 for v in value)
            )
        )
        if not ok:
            raise ValueError(
                'not devices (allowed: a count 1 <= value <= 4096, -1 for all, ids as "0,1" or [0, 1], or auto)'
            )
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value):
        value = str(value) if _is_number(value) else value  # precision=32
        if value not in PRECISIONS:
            raise ValueError(f"not a precision Lightning knows (allowed: one of {', '.join(PRECISIONS)})")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value):
        if value in STRATEGIES:
            return value
        from lightning.pytorch.strategies import StrategyRegistry

        known = StrategyRegistry.available_strategies()
        if value not in known:
            others = ", ".join(sorted(set(known) - set(STRATEGIES))[:6])
            raise ValueError(
                f"not a strategy Lightning knows (allowed: one of {', '.join(STRATEGIES)}, or one it registers: {others}, ...)"
            )
        return value


# GPT-2's matrices a LoRA adapter may go on (train.lora.targets); the tied wte / lm_head never get one
LORA_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


class Lora(Group):
    enabled: bool
    rank: Annotated[int, Field(ge=1, le=4096)]
    alpha: Annotated[float, Field(gt=0, le=65536)]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    targets: Annotated[list[Literal[LORA_TARGETS]], Field(min_length=1)]  # type: ignore[valid-type]  # (pydantic reads a tuple there)
    adapter: str | None  # continue from this PEFT adapter folder

    @field_validator("targets")
    @classmethod
    def _distinct(cls, targets: list[str]) -> list[str]:
        if len(set(targets)) != len(targets):
            raise ValueError("a target is listed twice; list each once")
        return targets


class Train(Group):
    block_size: Annotated[int, Field(ge=1, le=1 << 20)]
    batch_size: Annotated[int, Field(ge=1, le=1 << 20)]
    auto_batch_size: bool
    lr: LearningRate
    weight_decay: Annotated[float, Field(ge=0, le=10)]
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]
    warmup_steps: NonNegInt
    schedule: Literal["cosine", "linear", "constant"]
    decay_steps: PosInt | None
    min_lr_ratio: Ratio
    grad_clip: NonNegFloat
    val_every_n_steps: PosInt
    val_batches: PosInt
    ckpt_every_n_steps: PosInt
    keep_all_checkpoints: bool
    ckpt_dir: str
    out_dir: str
    resume: bool
    early_stop_patience: NonNegInt
    save: Literal["best", "last"]
    gradient_checkpointing: bool
    freeze_embeddings: bool
    compile: bool
    keep_freed_memory: bool = False
    lora: Lora


class WandbLogger(Group):
    kind: Literal["wandb"]
    project: str
    group: str | None
    tags: list[str]
    job_type: str | None
    name: str | None
    save_dir: str


class NoLogger(Group):
    model_config = ConfigDict(extra="ignore")  # logger.kind=none over wandb's keys: they are simply unused
    kind: Literal["none"]


class Sample(Group):
    every_n_steps: NonNegInt
    prompts: list[str]
    unconditional: NonNegInt
    random_prompts: NonNegInt
    random_prompt_tokens: PosInt
    temperatures: Annotated[list[Temperature], Field(min_length=1)]
    max_new_tokens: PosInt
    top_k: NonNegInt
    top_p: TopP
    seed: Seed
    copy_min_span: NonNegInt


class Export(Group):
    out_dir: str
    opset: Annotated[int, Field(ge=17, le=20)]  # LayerNormalization needs 17; the TorchScript exporter stops at 20
    graph: Literal["fused", "lean", "transformers"]
    dtype: Literal["fp32", "fp16"]
    quantize: list[Literal["q8", "q4", "int8"]]
    gguf: list[Literal["f32", "f16", "q8_0", "q4_0"]]

    @field_validator("quantize", "gguf", mode="before")
    @classmethod
    def _one_or_none(cls, value):
        return [value] if isinstance(value, str) else value  # export.gguf=q8_0: one type

    parity_prompts: Annotated[list[str], Field(min_length=1)]
    parity_new_tokens: PosInt
    parity_atol: Annotated[float, Field(gt=0, le=10)]
    parity_atol_fp16: Annotated[float, Field(gt=0, le=10)]
    card_name: str | None
    card_license: Annotated[str, Field(min_length=1)]
    card_samples: NonNegInt | None
    transformers_js: bool


class Site(Group):
    out_dir: str
    model_dir: str
    graph: Literal["int8", "q8", "q4", "fp32"]
    web_dir: str
    max_threads: Annotated[int, Field(ge=1, le=64)]
    max_tokens: PosInt


class Generate(Group):
    model_dir: str
    graph: str
    provider: Literal["cpu", "cuda"]
    threads: Threads
    prompts: Annotated[list[str], Field(min_length=1)]
    nsamples: PosInt
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    max_new_tokens: PosInt
    min_new_tokens: NonNegInt
    do_sample: bool
    temperature: Annotated[float, Field(ge=0, le=100)]  # > 0 when sampling; greedy ignores it
    top_k: NonNegInt
    top_p: TopP
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)]  # (smaller ones overflow fp32 logits)
    stop: list[str]
    truncate: str | None
    include_prefix: bool
    strip: bool
    check_copies: bool
    copy_min_span: NonNegInt
    max_copied_span: NonNegInt | None
    copy_retries: NonNegInt
    rank: bool
    seed: Seed | None
    stream: bool
    destination: str | None
    delimiter: str
    report: str | None


class Verbosify(Group):
    model: str
    document: str
    sentences: PosInt
    min_words: NonNegInt
    steps: Annotated[int, Field(ge=0, le=10_000)]  # 0: no finetuning, continue the base model
    lr: LearningRate
    candidates: Annotated[int, Field(ge=1, le=1000)]
    max_new_tokens: PosInt
    max_sentences: PosInt
    temperature: Temperature
    top_k: NonNegInt
    seed: Seed
    output: str
    report: str


class Serve(Group):
    model_dir: str
    graph: str
    model_name: Annotated[str, Field(min_length=1)]
    models: dict[Annotated[str, Field(min_length=1)], str] | None  # null: {model_name: model_dir}
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    max_sequences: Annotated[int, Field(ge=1, le=4096)]
    context: Annotated[int, Field(ge=2, le=1 << 20)] | None
    queue_size: Annotated[int, Field(ge=1, le=1 << 20)]
    request_timeout: Annotated[float, Field(gt=0, le=86400)]
    stream_interval: Annotated[float, Field(ge=0, le=60)]
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)]
    max_n: Annotated[int, Field(ge=1, le=4096)]
    max_prompts: Annotated[int, Field(ge=1, le=65536)]
    max_logprobs: Annotated[int, Field(ge=0, le=4096)]
    threads: Threads | Literal["auto"]  # auto: one thread under 2M parameters (all cores alone), else all (threads_for)
    spin: bool
    warm_up: bool
    api_key: str | None
    max_tokens: PosInt
    temperature: Annotated[float, Field(ge=0, le=100)]  # 0: greedy (OpenAI's convention)
    top_k: NonNegInt
    top_p: TopP
    chat_template: str | None  # null: the tokenizer's own
    copy_index: str | None  # a prepared folder; null: requests cannot ask for copy measures
    copy_min_span: PosInt


class Chain(Group):
    prompts_model: str
    responses_model: str
    n: PosInt
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    prompt_tokens: PosInt
    response_tokens: PosInt
    min_new_tokens: NonNegInt
    temperature: Temperature
    top_k: NonNegInt
    seed: Seed | None  # null: random
    threads: Threads
    output: str


class Config(Group):
    """The whole composed config (conf/config.yaml and its groups)."""

    seed: Seed
    paths: Paths
    data: Data
    model: Model
    trainer: Trainer
    train: Train
    logger: Annotated[WandbLogger | NoLogger, Field(discriminator="kind")]
    sample: Sample
    export: Export
    generate: Generate
    verbosify: Verbosify
    serve: Serve
    site: Site
    chain: Chain | None = None  # experiment=wp_responses / wp_prompts only

    @model_validator(mode="after")
    def _across_groups(self) -> Config:
        if self.generate.do_sample and self.generate.temperature <= 0:
            raise _KeyError(
                "generate.temperature",
                self.generate.temperature,
                "must be > 0 when sampling (greedy: generate.do_sample=false)",
            )
        if self.train.lora.enabled and self.model.name_or_path is None:
            raise _KeyError(
                "train.lora.enabled",
                True,
                "LoRA adapts a pretrained model: set model.name_or_path (a hub name, or a local folder such as the "
                "quickstart's artifacts/model), or train.lora.enabled=false to train from scratch",
            )
        if self.trainer.strategy == "fsdp" and self.trainer.fsdp is None:
            raise _KeyError("trainer.fsdp", None, "strategy fsdp needs the fsdp block: use trainer=fsdp")
        n_positions = self.model.n_positions
        if self.model.name_or_path is None and n_positions is not None and self.train.block_size > n_positions:
            raise _KeyError(
                "train.block_size",
                self.train.block_size,
                f"more than the model's context, model.n_positions={self.model.n_positions}: "
                f"set train.block_size={self.model.n_positions} or less",
            )
        return self


# -- validation with one-line errors ------------------------------------------------------------------


class _KeyError(ValueError):
    """A cross-field check's failure, naming the key at fault (not the object that ran the check)."""

    def __init__(self, key: str, value, reason: str):
        super().__init__(f"{key}={value!r}: {reason}" if value is not None else f"{key}: {reason}")


def validate(values: dict, source: str = "") -> Config:
    """``values`` (the composed, resolved YAML) as a typed ``Config``; bad values raise one ``ConfigError`` line."""
    from penwright.core.errors import ConfigError

    try:
        return Config.model_validate(values)
    except ValidationError as err:
        lines = _describe(err, values)
        more = f" (and {len(lines) - 1} more: {'; '.join(lines[1:3])})" if len(lines) > 1 else ""
        raise ConfigError(f"{source + ': ' if source else ''}{lines[0]}{more}") from None


def _describe(err: ValidationError, values: dict) -> list[str]:
    """One message per bad key: ``key=value: what is wrong (allowed: ...)``."""
    out, seen = [], set()
    for e in err.errors(include_url=False):
        if e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), _KeyError):
            message = str(e["ctx"]["error"])
            key = message.split("=", 1)[0].split(":", 1)[0]
        else:
            loc = list(e["loc"]) if e["type"] == "extra_forbidden" else _key_parts(e["loc"])
            item = int(loc.pop()) if loc and isinstance(loc[-1], int) else None  # an item of a list: name the list
            key = ".".join(str(p) for p in loc)
            message = _one(e, key, values, item)
        if key not in seen:
            seen.add(key)
            out.append(message)
    return out


def _key_parts(loc: tuple) -> list:
    """The parts of an error's location that are keys or list indices: pydantic also puts the union member or
    discriminator value it tried there (``int``, ``wandb``, ``function-after[...]``), which are not keys."""
    parts: list = []
    models: list[type[BaseModel]] = [Config]
    for part in loc:
        if isinstance(part, int):
            parts.append(part)
            continue
        info = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if info is None:
            continue  # a union tag
        parts.append(part)
        models = _models_of(info.annotation) or models
    return parts


def _one(e: Mapping[str, Any], key: str, values: dict, item: int | None = None) -> str:
    kind, value = e["type"], e.get("input")
    if kind == "missing":
        return f"{key}: missing; add it to the group's YAML in conf/ (or pass {key}=...)"
    if kind == "extra_forbidden":
        return f"{key}: not a known key; `penwright show` prints every key"
    allowed = allowed_values(key)
    shown = _lookup(values, key, value)
    reason = {
        "greater_than": "out of range",
        "greater_than_equal": "out of range",
        "less_than": "out of range",
        "less_than_equal": "out of range",
        "literal_error": "not one of the choices",
        "union_tag_invalid": "not one of the choices",
        "int_type": "not an integer",
        "int_from_float": "not an integer",
        "float_type": "not a number",
        "bool_type": "not true or false",
        "string_type": "not a string",
        "list_type": "not a list",
        "too_short": "too few items",
        "too_long": "too many items",
        "value_error": None,
    }.get(kind, None)
    if reason is None:
        return f"{key}={shown!r}: {e['msg'].removeprefix('Value error, ')}"
    if item is not None:
        reason = f"item {item} ({value!r}) {reason}"
    return f"{key}={shown!r}: {reason}" + (f" (allowed: {allowed})" if allowed else "")


def _lookup(values: dict, key: str, fallback):
    node = values
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return fallback
    return node


def field_at(key: str):
    """The schema's ``FieldInfo`` for a dotted key (list indices skipped), or None."""
    model: Any = Config
    info = None
    for part in key.split("."):
        if part.isdigit():
            continue
        fields = _models_of(model)
        info = next((m.model_fields[part] for m in fields if part in m.model_fields), None)
        if info is None:
            return None
        model = info.annotation
    return info


def _models_of(annotation) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation holds (``X | None``, a union of loggers, ...)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _models_of(arg)
    return out


def bounds(annotation, metadata=()) -> dict:
    """``{"ge": 1, "le": 65535}`` and ``choices`` of a field's type (looking through ``X | None``, lists)."""
    import typing

    found: dict = {}
    for m in metadata:
        for attr, cls in (("ge", Ge), ("gt", Gt), ("le", Le), ("lt", Lt)):
            if isinstance(m, cls):
                found[attr] = getattr(m, attr)
    origin = typing.get_origin(annotation)
    if origin is list:
        inner = bounds(typing.get_args(annotation)[0])
        found.update({k: v for k, v in inner.items() if k not in found or k == "choices"}, items=True)
    elif origin is Literal:
        found["choices"] = list(typing.get_args(annotation))
    elif origin is Annotated:
        inner, *meta = typing.get_args(annotation)
        found = {**bounds(inner, [x for m in meta for x in getattr(m, "metadata", [m])]), **found}
    elif origin is not None:
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                for k, v in bounds(arg).items():
                    found.setdefault(k, v)
    return found


def allowed_values(key: str) -> str:
    """What a key may be, in words: ``1 <= value <= 65535``, ``one of cpu, cuda``, ``a number > 0``."""
    info = field_at(key)
    if info is None:
        return ""
    b = bounds(info.annotation, info.metadata)
    each = "a list, each item " if b.get("items") else ""
    if "choices" in b:
        return f"{each}one of " + ", ".join(str(c) for c in b["choices"])
    low = f"{b['ge']} <= " if "ge" in b else f"{b['gt']} < " if "gt" in b else ""
    high = f" <= {b['le']}" if "le" in b else f" < {b['lt']}" if "lt" in b else ""
    if not (low or high):
        return ""
    nullable = " or null" if _nullable(info.annotation) else ""
    return f"{each}{low}value{high}{nullable}"


def _nullable(annotation) -> bool:
    import typing

    return type(None) in typing.get_args(annotation)
