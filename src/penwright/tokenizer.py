"""The tokenizer of a run: a pretrained GPT-2 BPE, a byte-level BPE trained on the corpus, or bytes.

``bytes`` is the character-level option (char-RNN style): one token per UTF-8 byte (one per
character for ASCII text) plus the two special tokens, i.e. a byte-level BPE with no merges.

Either way the result is a ``PreTrainedTokenizerFast`` whose EOS is ``<|endoftext|>`` (one id),
saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

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


def _tiktoken_encoding(spec_json: str):
    """A tiktoken ``Encoding`` with the vocab and merges of a tokenizers JSON spec, or None when the
    spec is not a GPT-2-style byte-level BPE (no normalizer, GPT-2's split pattern, merges ranked by
    id, plain added tokens), which is what GPT-2 and penwright's trained BPE are."""
    import json

    try:
        import tiktoken
    except ImportError:
        return None
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):  # tiktoken < 0.8
        return None
    spec = json.loads(spec_json)
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
        return tiktoken.Encoding("penwright", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    except ValueError:
        return None


def _encode(enc, text: str) -> np.ndarray:
    return enc.encode_to_numpy(text, allowed_special="all", disallowed_special=())


_WORKER_ENCODING = None  # the Encoding of a worker process


def _start_worker(spec_json: str) -> None:
    global _WORKER_ENCODING
    _WORKER_ENCODING = _tiktoken_encoding(spec_json)


def _encode_in_worker(text: str) -> np.ndarray:
    return _encode(_WORKER_ENCODING, text)


class FastEncoder:
    """``encoder(texts) -> [ids, ...]``: tiktoken with a tokenizer's vocab and merges (4x faster here
    than the tokenizers batch API), on ``workers`` processes (default: one per core; 1: in this process).

    Processes, not threads: tiktoken's threads scaled 0.85-1.6x on 2 cores in five runs here,
    processes 1.8x. Workers are forked on Linux, each builds its own Encoding once; ``close()`` (or
    ``with``) ends them. ``prepare`` still checks that it gives the tokenizers ids on the corpus.
    """

    def __init__(self, spec_json: str, encoding, workers: int | None = None):
        import multiprocessing
        import os
        import sys
        from concurrent.futures import ProcessPoolExecutor

        self.encoding = encoding
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.pool = None
        if self.workers > 1:  # fork on Linux (instant); elsewhere the platform's default (spawn: safe, slower start)
            context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                            initargs=(spec_json,))

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return self.submit(texts)()

    def submit(self, texts: list[str]) -> Callable[[], list[np.ndarray]]:
        """Start encoding ``texts``; returns a function that waits for their ids (workers encode while
        the caller reads on)."""
        if self.pool is None:
            ids = [_encode(self.encoding, t) for t in texts]
            return lambda: ids
        futures = [self.pool.submit(_encode_in_worker, t) for t in texts]
        return lambda: [f.result() for f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> "FastEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fast_encoder(tokenizer: PreTrainedTokenizerFast, workers: int | None = None) -> FastEncoder | None:
    """A ``FastEncoder`` for ``tokenizer``, or None when tiktoken cannot express it (see ``_tiktoken_encoding``)."""
    spec_json = tokenizer.backend_tokenizer.to_str()
    encoding = _tiktoken_encoding(spec_json)
    return None if encoding is None else FastEncoder(spec_json, encoding, workers)


def limit_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """``texts`` until about ``max_bytes`` of UTF-8 have passed (the rest is not read)."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return
