"""The tokenizer of a run: a pretrained GPT-2 BPE, a byte-level BPE trained on the corpus, or bytes.

``bytes`` is the character-level option (char-RNN style): one token per UTF-8 byte (one per
character for ASCII text) plus the two special tokens, i.e. a byte-level BPE with no merges.

Either way the result is a ``PreTrainedTokenizerFast`` whose EOS is ``<|endoftext|>`` (one id),
saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from penwright.errors import ConfigError, PenwrightError
from penwright.hub import load_pretrained

EOS = "<|endoftext|>"
BOS_TEXT = "<|startoftext|>"  # gpt-2-simple's row opener: one token in a trained BPE, plain text in GPT-2's
TYPES = ("bpe", "bytes", "pretrained")
BYTES_VOCAB = 258  # 256 bytes + <|endoftext|> + <|startoftext|>


def check_config(tok_cfg) -> None:
    """Reject tokenizer settings that cannot work, naming the key."""
    kind = tok_cfg.get("type")
    if kind not in TYPES:
        raise ConfigError(f"model.tokenizer.type={kind!r}: use one of {', '.join(TYPES)}")
    if kind == "pretrained" and not tok_cfg.get("name_or_path"):
        raise ConfigError("model.tokenizer.name_or_path is empty: give a hub name (gpt2) or a local directory")
    if kind == "bpe":
        vocab = int(tok_cfg.vocab_size)
        if vocab < 258:
            raise ConfigError(
                f"model.tokenizer.vocab_size={vocab}: a byte-level BPE needs at least 258 "
                f"(256 bytes + {EOS} + {BOS_TEXT})"
            )


def load_pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer (or any fast tokenizer) from a hub name or a local directory."""
    tok = load_pretrained(name_or_path, AutoTokenizer.from_pretrained, "tokenizer", "model.tokenizer.name_or_path",
                          extra=" (or model.name_or_path=DIR, which sets the model and its tokenizer)")
    if not getattr(tok, "is_fast", False):
        raise PenwrightError(f"model.tokenizer.name_or_path={name_or_path}: a fast (Rust) tokenizer is needed")
    if tok.eos_token_id is None:
        raise PenwrightError(f"model.tokenizer.name_or_path={name_or_path}: the tokenizer has no EOS token")
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (plus the two special tokens): the same format as a trained BPE, no merges."""
    return train_bpe([], BYTES_VOCAB)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with ``vocab_size`` entries, learned from ``texts`` (streamed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, BOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size()
    if got < vocab_size:
        raise ConfigError(
            f"model.tokenizer.vocab_size={vocab_size}: the training split only yields {got} BPE tokens "
            f"(merges seen at least {min_frequency} times). Set model.tokenizer.vocab_size={got} or less, "
            f"or add text"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=1_000_000
    )


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (char -> byte)."""
    from tokenizers.pre_tokenizers import ByteLevel

    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    decoder = {c: b for b, c in chars.items()}
    assert set(decoder) == set(ByteLevel.alphabet())
    return decoder


def fast_encoder(tokenizer: PreTrainedTokenizerFast, threads: int | None = None
                 ) -> Callable[[list[str]], list[np.ndarray]] | None:
    """A tiktoken encoder with the same vocab and merges as ``tokenizer`` (4x faster here), or None.

    Only for GPT-2-style byte-level BPEs (no normalizer, GPT-2's split pattern, merges ranked by id,
    plain added tokens), which is what GPT-2 and penwright's trained BPE are. ``prepare`` still checks
    that both give the same ids on the corpus before it relies on it. Texts are encoded on ``threads``
    threads (default: one per core).
    """
    import json
    import os

    try:
        import tiktoken
    except ImportError:
        return None
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):  # tiktoken < 0.8
        return None
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or spec.get("normalizer")
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("dropout")
    ):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    special = {t["content"]: t["id"] for t in added}
    byte_of = _byte_decoder()
    try:
        ranks = {bytes(byte_of[c] for c in piece): i for piece, i in model["vocab"].items() if piece not in special}
    except KeyError:
        return None
    try:
        enc = tiktoken.Encoding("penwright", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    except ValueError:
        return None
    pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="penwright-encode")

    def encode_one(text: str) -> np.ndarray:  # tiktoken releases the GIL while it encodes
        return enc.encode_to_numpy(text, allowed_special="all", disallowed_special=())

    def encode(texts: list[str]) -> list[np.ndarray]:
        return list(pool.map(encode_one, texts))

    return encode


def limit_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """``texts`` until about ``max_bytes`` of UTF-8 have passed (the rest is not read)."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return
