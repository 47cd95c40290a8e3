"""Stage ``prepare``: raw corpus -> ``train.bin`` / ``val.bin`` token memmaps, ``tokenizer/``, ``meta.json``,
``documents.json`` (each split's document hashes, for ``generate.check_copies``: see ``penwright.prepare.copies``).

1. scan the corpus (every file checked and its documents counted before anything is written);
2. split documents into train/val with a seeded draw (a single document splits by token range);
3. train a byte-level BPE on the training split, or load the pretrained GPT-2 tokenizer;
4. tokenize chunk by chunk (splintr, a Rust BPE built from the same vocab, on every core, when it
   gives the fast tokenizer's ids; else the tokenizers batch API) on a background thread while the
   stage reads on, each document followed by ONE EOS id, appending to flat uint16 (or uint32)
   files that ``np.memmap`` reads;
5. write everything into a temporary directory and rename it into place, so a failure leaves
   the previous output (or nothing), never half of one.

Memory stays flat in corpus size: text is read in ``data.chunk_bytes`` chunks and at most two
batches of chunks and their ids are held at a time.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from penwright.core import copy_index, schema
from penwright.core.atomic import staged_dir
from penwright.core.chat_format import EOS
from penwright.core.errors import CorpusError
from penwright.core.files import save_tokenizer
from penwright.core.log import get_logger
from penwright.prepare import copies
from penwright.prepare.chat_corpus import openings, read_corpus, split_one
from penwright.prepare.corpus import CHAT_FORMATS, CorpusSpec, Source, iter_documents, scan
from penwright.prepare.tokenizer import (
    BYTES_VOCAB,
    BatchEncoder,
    byte_tokenizer,
    fast_encoder,
    limit_bytes,
    load_pretrained_tokenizer,
    tokenizers_batch,
    train_bpe,
)

META_VERSION = 1
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
BATCH_CHUNKS = 8  # chunks encoded per batch call: enough to keep every core busy


@dataclass
class SplitStats:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0


@dataclass
class _Writer:
    """Appends ids to ``<split>.bin`` and keeps the counts for meta.json."""

    path: Path
    dtype: np.dtype
    stats: SplitStats = field(default_factory=SplitStats)
    starts: list[int] = field(default_factory=list)  # where each document begins, in tokens (the copy index's)

    def __post_init__(self):
        self.file = open(self.path, "wb")

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.file.write(arr.tobytes())
        self.stats.tokens += arr.size

    def end_document(self) -> None:
        """The document written since the last call ends: the next one begins here."""
        self.starts.append(self.stats.tokens)

    def close(self) -> None:
        self.file.close()


log = get_logger("prepare").info


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask over documents: True for validation. Seeded; at least one doc on each side."""
    is_val = np.zeros(n_docs, dtype=bool)
    if val_fraction <= 0 or n_docs < 2:
        return is_val
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    rng = np.random.default_rng(seed)
    is_val[rng.choice(n_docs, size=n_val, replace=False)] = True
    return is_val


def _documents(sources: list[Source], spec: CorpusSpec) -> Iterator[tuple[int, Iterator[str]]]:
    index = 0
    for source in sources:
        for doc in iter_documents(source, spec):
            yield index, doc
            index += 1


def documents_by_split(data: schema.Data) -> Iterator[tuple[bool, str]]:
    """``(is_val, text)`` for each document of the corpus ``data`` describes, split as ``prepare`` splits it."""
    spec = CorpusSpec.from_config(data)
    sources = scan(spec)
    is_val = split_documents(sum(s.documents for s in sources), data.val_fraction, data.split_seed)
    for index, chunks in _documents(sources, spec):
        yield bool(is_val[index]), "".join(chunks)


def _training_text(sources, spec, is_val, single_doc_limit: int | None) -> Iterator[str]:
    for index, chunks in _documents(sources, spec):
        if is_val[index]:
            continue
        yield from (limit_bytes(chunks, single_doc_limit) if single_doc_limit else chunks)


def prepare(cfg: schema.Config) -> dict:
    """Run the stage on a composed config; returns what it wrote to meta.json."""
    start = time.perf_counter()
    data = cfg.data
    spec = CorpusSpec.from_config(data)
    tok_cfg = cfg.model.tokenizer
    val_fraction = data.val_fraction
    out_dir = Path(data.out_dir)

    sources = scan(spec)
    if any(s.format in CHAT_FORMATS for s in sources):
        return prepare_chats(cfg, spec, sources, start)
    n_docs = sum(s.documents for s in sources)
    total_bytes = sum(s.size for s in sources)
    log(f"{spec.path}: {len(sources)} file(s), {n_docs:,} document(s), {total_bytes / 1e6:.2f} MB")
    single = n_docs == 1
    is_val = split_documents(n_docs, val_fraction, data.split_seed)

    with staged_dir(out_dir) as tmp:  # an error or a kill leaves an earlier prepared dir as it was
        single_limit = int(total_bytes * (1 - val_fraction)) if single else None
        tokenizer = make_tokenizer(tok_cfg, lambda: _training_text(sources, spec, is_val, single_limit))
        save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)

        vocab_size = len(tokenizer)
        eos = int(tokenizer.eos_token_id)
        dtype = dtype_for(vocab_size)
        encoder_name, encode = choose_encoder(tokenizer, _probe_text(sources, spec), data.fast_encode)
        log(f"tokenizing with {encoder_name} ({len(tokenizer):,} tokens, EOS id {eos})")
        writers = {s: _Writer(tmp / f"{s}.bin", dtype) for s in SPLITS}
        try:
            digests = _tokenize(sources, spec, encode, eos, is_val, writers, total_bytes)
        finally:
            encode.close()
            for w in writers.values():
                w.close()
        stats = {s: writers[s].stats for s in SPLITS}
        if single and val_fraction > 0:
            _split_tokens(tmp, dtype, val_fraction, stats, tokenizer)

        split = {"by": "tokens" if single else "documents", "val_fraction": val_fraction, "seed": data.split_seed}
        meta = _meta(tmp, tokenizer, tok_cfg, encoder_name, split, spec, sources, n_docs, total_bytes, stats)
        if data.copy_index:
            names = [n for n, v in zip(document_names(sources, spec), is_val) if not v or single]
            starts = writers["train"].starts if not single else []
            meta["copy_index"] = _index(tmp, dtype, eos, vocab_size, data.copy_index_max_gib, starts, names)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        copies.write(tmp, digests, spec.csv_prefix)  # what generate.check_copies compares samples with

    _done(out_dir, stats, dtype, vocab_size, start, total_bytes)
    return meta


def _done(
    out_dir: Path, stats: dict, dtype: np.dtype, vocab_size: int, start: float, total_bytes: int, extra=""
) -> None:
    seconds = time.perf_counter() - start
    log(
        f"wrote {out_dir}/: train {stats['train'].tokens:,} tokens ({stats['train'].documents:,} docs), "
        f"val {stats['val'].tokens:,} tokens ({stats['val'].documents:,} docs), {dtype.name}, "
        f"vocab {vocab_size:,}, in {seconds:.1f} s ({total_bytes / 1e6 / seconds:.1f} MB/s){extra}"
    )


def _meta(tmp: Path, tokenizer, tok_cfg, encoder: str, split: dict, spec, sources, n_docs, total_bytes, stats) -> dict:
    """meta.json: what train reads (dtype, vocabulary, EOS, the token counts) and what the corpus was."""
    return {
        "format_version": META_VERSION,
        "dtype": dtype_for(len(tokenizer)).name,
        "vocab_size": len(tokenizer),
        "eos_token_id": int(tokenizer.eos_token_id),
        "tokenizer": {
            "type": tok_cfg.type,
            "name_or_path": None if tok_cfg.type in ("bpe", "bytes") else tok_cfg.name_or_path,
            "md5": copy_index.md5_of(tmp / TOKENIZER_DIR / "tokenizer.json"),
            "encoder": encoder,
        },
        "data": {
            "path": spec.path,
            "glob": spec.glob,
            "files": len(sources),
            "documents": n_docs,
            "bytes": total_bytes,
            "md5": _md5_lines(f"{s.path.as_posix()} {s.md5}" for s in sources),
        },
        "split": split,
        **{s: vars(stats[s]) for s in SPLITS},
    }


def prepare_chats(cfg: schema.Config, spec: CorpusSpec, sources: list[Source], start: float) -> dict:
    """The stage on chat exports: one document per conversation, written in the chat template
    (``core.chat_format``), which is saved inline in the tokenizer's config. Beside each ``<split>.bin`` a
    ``<split>.mask`` (one uint8 per token) marks what the loss counts: the persona's turns, each up to and
    including its end-of-text token (``data.chat.loss_on=all``: every token, and no mask is written).
    ``openings.json`` holds the val contexts the training samples answer."""
    data = cfg.data
    chat = data.chat
    tok_cfg = cfg.model.tokenizer
    out_dir = Path(data.out_dir)
    documents_too = [str(s.path) for s in sources if s.format not in CHAT_FORMATS]
    if documents_too:
        raise CorpusError(
            f"{spec.path}: chat exports and documents together ({', '.join(documents_too[:3])} are documents): "
            "prepare them apart (data.path), or narrow data.glob"
        )
    corpus = read_corpus([(str(s.path), s.format) for s in sources], chat, spec.path)
    fmt, documents = corpus.format, corpus.documents
    if not documents:
        raise CorpusError(f"{spec.path}: {fmt.persona!r} speaks in no conversation: choose another data.chat.speaker")
    if len(documents) == 1:
        documents = split_one(documents, data.val_fraction)
        is_val = np.array([False, True][: len(documents)])
    else:
        is_val = split_documents(len(documents), data.val_fraction, data.split_seed)
    val_docs = [d for d, v in zip(documents, is_val) if v]
    persona_in_val = any(m["role"] == "assistant" for d in val_docs for m in d)
    if val_docs and not persona_in_val:
        raise CorpusError(
            f"{spec.path}: {fmt.persona!r} has no turns in the val split ({len(val_docs)} conversation(s)), so "
            "validation cannot measure the persona: raise data.val_fraction, change data.split_seed or add conversations"
        )
    total_bytes = sum(s.size for s in sources)
    summary = corpus.summary()
    log(
        f"{spec.path}: {len(sources)} chat export(s), {len(documents):,} conversation(s), persona {fmt.persona!r} "
        f"({summary['persona_turns']:,} turns) answering {fmt.other!r} and {len(corpus.speakers) - 2} more; "
        f"left out: {_counts(corpus.dropped) or 'nothing'}; scrubbed: {_counts(corpus.scrubbed) or 'nothing'}"
    )
    rendered = [fmt.render(d) for d in documents]
    masked = chat.loss_on == "persona"

    with staged_dir(out_dir) as tmp:
        tokenizer = make_tokenizer(
            tok_cfg, lambda: (t.replace(EOS, "\n") for (t, _), v in zip(rendered, is_val) if not v)
        )
        tokenizer.chat_template = fmt.jinja()
        save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        eos, dtype = int(tokenizer.eos_token_id), dtype_for(len(tokenizer))
        writers = {s: _Writer(tmp / f"{s}.bin", dtype) for s in SPLITS}
        masks = {s: open(tmp / f"{s}.mask", "wb") for s in SPLITS} if masked else {}
        loss = {s: {"loss_tokens": 0, "loss_bytes": 0} for s in SPLITS}
        digests: dict[str, set[bytes]] = {s: set() for s in SPLITS}
        try:
            for first in range(0, len(documents), 256):  # a chat corpus is small: no progress bar
                batch = list(zip(documents, rendered, is_val))[first : first + 256]
                texts = [text for _, (text, _), _ in batch]
                encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
                for (doc, (text, spans), val), ids, offsets in zip(
                    batch, encoded["input_ids"], encoded["offset_mapping"]
                ):
                    if tokenizer.apply_chat_template(doc, tokenize=False) != text:  # the one template, everywhere
                        raise RuntimeError(
                            f"the chat template renders a conversation otherwise than prepare: {doc[:2]}"
                        )
                    part = "val" if val else "train"
                    hasher = copies.DocumentHasher(spec.csv_prefix)
                    hasher.update(text)
                    digests[part].add(hasher.digest())
                    mask = _loss_mask(offsets, spans) if masked else np.ones(len(ids), dtype=np.uint8)
                    if not ids or ids[-1] != eos:  # each conversation ends with one EOS (the loss skips it)
                        ids, mask = [*ids, eos], np.append(mask, np.uint8(0))
                    writers[part].write(ids)
                    writers[part].end_document()
                    writers[part].stats.documents += 1
                    writers[part].stats.bytes += len(text.encode("utf-8"))
                    loss[part]["loss_tokens"] += int(mask.sum())
                    counted = [text[a : b - len(EOS)] for a, b in spans] if masked else [text]
                    loss[part]["loss_bytes"] += sum(len(t.encode("utf-8")) for t in counted)
                    if masked:
                        masks[part].write(mask.tobytes())
        finally:
            for w in writers.values():
                w.close()
            for f in masks.values():
                f.close()
        stats = {s: writers[s].stats for s in SPLITS}
        split = {"by": "documents", "val_fraction": data.val_fraction, "seed": data.split_seed}
        meta = _meta(tmp, tokenizer, tok_cfg, "tokenizers", split, spec, sources, len(documents), total_bytes, stats)
        for name in SPLITS:
            meta[name].update(loss[name])
        if data.copy_index:
            names = [f"conversation {k + 1} of {len(documents)}" for k, v in enumerate(is_val) if not v]
            starts = writers["train"].starts
            meta["copy_index"] = _index(tmp, dtype, eos, len(tokenizer), data.copy_index_max_gib, starts, names)
        meta["chat"] = {
            "format": sorted({s.format for s in sources}),
            "loss_on": chat.loss_on,
            "mask": masked,
            **summary,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "openings.json").write_text(
            json.dumps(
                [
                    {
                        **o,
                        "prompt": tokenizer.apply_chat_template(
                            o["context"], tokenize=False, add_generation_prompt=True
                        ),
                    }
                    for o in openings(val_docs, chat.openings)
                ],
                indent=1,
                ensure_ascii=False,
            )
            + "\n"
        )
        copies.write(tmp, digests, spec.csv_prefix)

    left_out = _counts(corpus.dropped)
    _done(out_dir, stats, dtype, len(tokenizer), start, total_bytes, f"; left out: {left_out or 'nothing'}")
    return meta


def _index(
    tmp: Path, dtype: np.dtype, eos: int, vocab_size: int, max_gib: float, starts: list[int], names: list[str]
) -> dict:
    """The copy index of the training split (``core.copy_index``), beside the token files: its documents begin at
    ``starts`` (tokens; one document split by tokens: none given, it begins at 0) and are called ``names``."""
    path = tmp / "train.bin"
    tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
    begins = [0, *starts[:-1]] if starts else [0]
    info = copy_index.build(tmp, tokens, eos, vocab_size, max_gib, begins, names)
    log(f"copy index: {tokens.size:,} training tokens in {info['seconds']:.1f} s")
    return {"tokens": info["tokens"], "train_md5": info["train_md5"]}


def _loss_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token that starts inside one of ``spans`` (character ranges), else 0."""
    starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return mask


def document_names(sources: list[Source], spec: CorpusSpec) -> list[str]:
    """Every document's name, in corpus order: its file (relative to ``data.path``), and ``#row`` where the file
    holds several (rows, or pieces between delimiters)."""
    root = Path(spec.path)
    names = []
    for source in sources:
        name = str(source.path.relative_to(root)) if source.path != root and root.is_dir() else source.path.name
        names += [name] if source.documents == 1 else [f"{name}#{k + 1}" for k in range(source.documents)]
    return names


def _counts(counter) -> str:
    return ", ".join(f"{n:,} {what}" for what, n in counter.most_common())


def make_tokenizer(tok_cfg: schema.Tokenizer, training_text: Callable[[], Iterable[str]]):
    """The tokenizer ``model.tokenizer`` asks for: a byte-level BPE trained on ``training_text()``, bytes, or a
    pretrained one."""
    if tok_cfg.type == "bpe":
        log(f"training a byte-level BPE of {tok_cfg.vocab_size:,} tokens on the training split")
        limit, vocab, min_frequency = tok_cfg.train_max_bytes, tok_cfg.vocab_size, tok_cfg.min_frequency
        assert limit is not None and vocab is not None and min_frequency is not None  # the schema requires them
        return train_bpe(limit_bytes(training_text(), limit), vocab, min_frequency)
    if tok_cfg.type == "bytes":
        log(f"byte-level tokenizer: one token per byte, {BYTES_VOCAB} tokens")
        return byte_tokenizer()
    assert tok_cfg.name_or_path  # the schema requires it for a pretrained tokenizer
    return load_pretrained_tokenizer(tok_cfg.name_or_path)


def choose_encoder(tokenizer, sample: list[str], fast: bool) -> tuple[str, BatchEncoder]:
    """The batch encoder to use: splintr when it gives exactly the fast tokenizer's ids on
    ``sample``, else the tokenizers batch API. Close it when done."""
    hf = tokenizers_batch(tokenizer)
    if fast:
        fast_encode = fast_encoder(tokenizer)
        if fast_encode is not None:
            try:
                agrees = [a.tolist() for a in fast_encode(sample)] == hf(sample)
            except Exception as err:  # a tokenizer splintr reads but cannot encode: not a reason to stop
                log(f"splintr cannot encode with this tokenizer ({type(err).__name__}: {err}); using tokenizers")
                agrees = False
            if agrees:
                return "splintr", fast_encode
            fast_encode.close()
    return "tokenizers", BatchEncoder(hf)


def _probe_text(sources, spec, max_bytes: int = 1 << 17) -> list[str]:
    """The first ~128 K characters of the corpus plus a mixed-script line: what both encoders must agree on."""
    probe = ["Ünïcödé — naïve café 12,345 tokens?!\n\n  indented\tand\r\nCRLF <|endoftext|> 日本語 🙂 it's we'll"]
    for _, doc in _documents(sources, spec):
        for chunk in doc:
            probe.append(chunk[:max_bytes])
            max_bytes -= len(probe[-1])
            if max_bytes <= 0:
                return probe
    return probe


def _tokenize(sources, spec, encode, eos, is_val, writers, total_bytes) -> dict[str, set[bytes]]:
    """Encode every document in batches of chunks; each document ends with one EOS id. Returns each
    split's document digests (``copies``: what ``generate.check_copies`` compares samples with).

    A batch is written (in order) only once the next one has been sent to the encoder, so the
    encoder works while this thread reads and writes; at most two batches are held at a time.
    """
    budget = BATCH_CHUNKS * spec.chunk_bytes
    entries: list[tuple[str, str | None]] = []  # (split, text) for text, (split, None) at a document's end
    texts: list[str] = []
    in_flight: deque = deque()  # (entries, wait for their ids) of batches sent to the encoder, oldest first
    pending = 0
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="tokenize",
        mininterval=0.5,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    last: dict[str, int | None] = {s: None for s in SPLITS}  # the last id written to each split

    def write(batch, wait) -> None:
        encodings = iter(wait())
        for split, text in batch:
            writer = writers[split]
            if text is None:
                writer.stats.documents += 1
                if last[split] != eos:  # a document that already ends in <|endoftext|> gets no second one
                    writer.write((eos,))
                writer.end_document()
                last[split] = eos
                continue
            ids = next(encodings)
            if len(ids):
                writer.write(ids)
                last[split] = int(ids[-1])

    def flush(keep: int) -> None:
        in_flight.append((list(entries), encode.submit(list(texts))))
        entries.clear()
        texts.clear()
        while len(in_flight) > keep:
            write(*in_flight.popleft())

    digests: dict[str, set[bytes]] = {s: set() for s in SPLITS}
    for index, chunks in _documents(sources, spec):
        split = "val" if is_val[index] else "train"
        hasher = copies.DocumentHasher(spec.csv_prefix)
        for text in chunks:
            hasher.update(text)
            size = len(text.encode("utf-8"))
            writers[split].stats.bytes += size
            entries.append((split, text))
            texts.append(text)
            pending += size
            if pending >= budget:
                flush(keep=1)
                bar.update(pending)
                pending = 0
        entries.append((split, None))
        digests[split].add(hasher.digest())
    flush(keep=0)
    bar.update(pending)
    bar.close()
    return digests


def _split_tokens(tmp: Path, dtype: np.dtype, val_fraction: float, stats, tokenizer) -> None:
    """One document: move the last ``val_fraction`` of its tokens from train.bin to val.bin."""
    train_path, val_path = tmp / "train.bin", tmp / "val.bin"
    n = stats["train"].tokens
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    if n_val == 0:
        return
    tokens = np.memmap(train_path, dtype=dtype, mode="r")
    tail = np.array(tokens[n - n_val :])
    del tokens
    tail.tofile(val_path)
    with open(train_path, "r+b") as f:
        f.truncate((n - n_val) * dtype.itemsize)
    val_bytes = len(tokenizer.decode(tail.tolist()).encode("utf-8"))
    stats["val"] = SplitStats(documents=1, bytes=val_bytes, tokens=int(n_val))
    stats["train"].tokens = int(n - n_val)
    stats["train"].bytes = max(0, stats["train"].bytes - val_bytes)


def _md5_lines(lines) -> str:
    md5 = hashlib.md5()
    for line in lines:
        md5.update(line.encode() + b"\n")
    return md5.hexdigest()
