"""The tokenizer of a run: a pretrained GPT-2 BPE, a byte-level BPE trained on the corpus, or bytes.

``bytes`` is the character-level option (char-RNN style): one token per UTF-8 byte (one per
character for ASCII text) plus the two special tokens, i.e. a byte-level BPE with no merges.

Either way the result is a ``PreTrainedTokenizerFast`` whose EOS is ``<|endoftext|>`` (one id),
saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from penwright.core.errors import ConfigError, PenwrightError
from penwright.core.hub import load_pretrained

EOS = "<|endoftext|>"
BOS_TEXT = "<|startoftext|>"  # gpt-2-simple's row opener: one token in a trained BPE, plain text in GPT-2's
BYTES_VOCAB = 258  # 256 bytes + <|endoftext|> + <|startoftext|>


def left_padded(tokenizer):
    """A copy of ``tokenizer`` that pads on the left, with ``<|endoftext|>`` as pad when it has none: what
    batched generation needs (the new tokens follow every prompt directly). The original is not changed:
    the tokenizer a stage saves or shares keeps its own settings."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer (or any fast tokenizer) from a hub name or a local directory."""
    tok = load_pretrained(
        name_or_path,
        AutoTokenizer.from_pretrained,
        "tokenizer",
        "model.tokenizer.name_or_path",
        extra=" (or model.name_or_path=DIR, which sets the model and its tokenizer)",
    )
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


def _fast_encoding(spec_json: str):
    """splintr's BPE (Rust) for a tokenizers JSON spec, or None when the spec is not a GPT-2-style
    byte-level BPE (no normalizer, GPT-2's split, no template, plain added tokens), which is what
    GPT-2 and penwright's trained BPE are. Added tokens written in the text are matched, as the
    tokenizers API does."""
    import json

    try:
        import splintr
    except ImportError:
        return None
    spec = json.loads(spec_json)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    post = spec.get("post_processor") or {}
    if (
        model.get("type") != "BPE"
        or spec.get("normalizer")
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space")
        or post.get("type", "ByteLevel") != "ByteLevel"
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("dropout")
    ):
        return None
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in spec.get("added_tokens") or []):
        return None
    try:
        encoding = splintr.from_json_bytes(spec_json.encode("utf-8"))
    except ValueError:
        return None
    return encoding if encoding.family == "BPE" else None


class BatchEncoder:
    """``encoder(texts) -> [ids, ...]`` for a batch function, run on one background thread.

    ``submit(texts)`` returns at once with a function that waits for the ids, so ``prepare`` reads and
    writes while a batch encodes (both encoders below release the GIL while they work). ``close()``
    (or ``with``) ends the thread.
    """

    def __init__(self, encode_batch: Callable[[list[str]], list]):
        from concurrent.futures import ThreadPoolExecutor

        self.encode_batch = encode_batch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="penwright-encode")

    def __call__(self, texts: list[str]) -> list:
        return self.submit(texts)()

    def submit(self, texts: list[str]) -> Callable[[], list]:
        """Start encoding ``texts``; returns a function that waits for their ids."""
        return self.pool.submit(self.encode_batch, texts).result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tokenizers_batch(tokenizer: PreTrainedTokenizerFast) -> Callable[[list[str]], list[list[int]]]:
    """The tokenizers API's batch encoding of ``tokenizer`` (no special tokens added): the reference."""
    backend = tokenizer.backend_tokenizer
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode_batch(texts, add_special_tokens=False)]


def _splintr_batch(encoding) -> Callable[[list[str]], list[np.ndarray]]:
    """splintr's batch encoding (across the cores on its own thread pool; ``RAYON_NUM_THREADS``
    limits it) as one uint32 array per text."""

    def encode(texts: list[str]) -> list[np.ndarray]:
        flat, offsets = encoding.encode_batch_flat(texts)
        ids, ends = np.frombuffer(flat, dtype="<u4"), np.frombuffer(offsets, dtype="<u8")
        return [ids[a:b] for a, b in zip(ends[:-1].tolist(), ends[1:].tolist())]

    return encode


def fast_encoder(tokenizer: PreTrainedTokenizerFast) -> BatchEncoder | None:
    """splintr with ``tokenizer``'s vocab and merges, or None when it cannot express it (see
    ``_fast_encoding``). ``prepare`` still checks that it gives the tokenizers ids on the corpus
    before using it; ``python -m benchmarks prepare`` has its rate beside the tokenizers API."""
    encoding = _fast_encoding(tokenizer.backend_tokenizer.to_str())
    return None if encoding is None else BatchEncoder(_splintr_batch(encoding))


def limit_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """``texts`` until about ``max_bytes`` of UTF-8 have passed (the rest is not read)."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return
