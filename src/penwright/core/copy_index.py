"""An index of the training tokens that answers, for any token sequence, the longest spans of it that occur
verbatim in the training split, and where (document, offset): what the copy measures of every sample are
made of (``copy_measures``).

It is a suffix array, built by libdivsufsort (the ``pydivsufsort`` package) and searched with its
``sa_search``. Each token id is written as three bytes, ``0x80 | id >> 14``, ``id >> 7 & 0x7f``,
``id & 0x7f``: only a token's first byte has its top bit set, so a byte pattern made of whole tokens can
only match at a token's start, and the byte suffix array kept at token starts (every third position) is a
suffix array over tokens. (pydivsufsort's own 16-bit mode views ids as byte pairs and filters the odd
positions in the same way, but its ``sa_search`` needs the unfiltered array, 2.5x the size.)

Files, in ``<prepared>/index/`` (beside the token files, written by ``prepare`` when ``data.copy_index``):
``tokens.u8`` (the encoded training split), ``sa.i32`` or ``sa.i64`` (byte offsets of the sorted suffixes),
``documents.i64`` (where each training document starts, in tokens) and ``index.json`` (sizes and the
md5 of the ``train.bin`` it indexes: a stale or foreign index is refused). All are memory-mapped.

``Copies`` measures texts (samples) with the tokenizer that made the index: their copy measures, their copied
spans (``⟦…⟧`` in markdown, character ranges in the API), and the baseline: the same measures on windows of the
validation split, text from the same source the model never trained on (new text shares some phrases with any
corpus, so a sample is suspicious when it copies far more than that).

The index holds the training text: it stays in the prepared folder and is never exported or shared.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from penwright.core.errors import PenwrightError
from penwright.core.files import load_tokenizer
from penwright.core.log import get_logger

log = get_logger("copies").info
DIR = "index"
BYTES_PER_TOKEN = 3
MAX_ID = (1 << 21) - 1  # 7 + 7 + 7 bits
FORMAT = 1


def encode(ids: np.ndarray) -> np.ndarray:
    """Token ids as 3 bytes each (see the module's docstring)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((ids.size, BYTES_PER_TOKEN), dtype=np.uint8)
    out[:, 0] = 0x80 | (ids >> 14)
    out[:, 1] = (ids >> 7) & 0x7F
    out[:, 2] = ids & 0x7F
    return out.reshape(-1)


def peak_bytes(tokens: int) -> int:
    """What building the index of ``tokens`` tokens holds at its peak (the encoded text, libdivsufsort's byte
    suffix array, the mask that keeps token starts, the kept array)."""
    n = tokens * BYTES_PER_TOKEN
    width = 4 if n < 2**31 else 8
    return n + n * width + n + tokens * width


def build(
    prepared: Path,
    tokens: np.ndarray,
    eos: int,
    vocab_size: int,
    max_gib: float,
    starts: list[int] | None = None,
    names: list[str] | None = None,
) -> dict:
    """Write the index of the training ``tokens`` into ``prepared/index``; refuses, before any work, a corpus
    whose build would need more than ``max_gib`` GiB. ``starts``: where each training document begins (None:
    after each ``eos``); ``names``: what each is called (its file), kept in ``documents.json``."""
    from pydivsufsort import divsufsort

    if vocab_size - 1 > MAX_ID:
        raise PenwrightError(f"a vocabulary of {vocab_size:,} tokens: the copy index holds ids up to {MAX_ID:,}")
    need = peak_bytes(tokens.size)
    if need > max_gib * 2**30:
        raise PenwrightError(
            f"the copy index of {tokens.size:,} training tokens needs about {need / 2**30:.1f} GiB at its peak, "
            f"more than data.copy_index_max_gib={max_gib}: raise it, or set data.copy_index=false (no copy measures)"
        )
    start = time.perf_counter()
    out = prepared / DIR
    out.mkdir()
    with open(out / "tokens.u8", "wb") as f:  # encoded in chunks: the text is never held twice
        for at in range(0, tokens.size, 1 << 24):
            f.write(encode(tokens[at : at + (1 << 24)]).tobytes())
    size = (out / "tokens.u8").stat().st_size
    text = np.memmap(out / "tokens.u8", dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)  # (never written)
    if text.size:
        sa = divsufsort(text)
        sa = sa[sa % BYTES_PER_TOKEN == 0]  # token starts: a suffix array over tokens
    else:
        sa = np.zeros(0, dtype=np.int32)
    sa.tofile(out / f"sa.{_suffix(sa.dtype)}")
    if starts is None:
        found = np.concatenate([[0], np.flatnonzero(np.asarray(tokens) == eos) + 1]).astype(np.int64)
        starts = found[found < tokens.size].tolist()
    if names is not None and len(names) != len(starts):
        raise ValueError(f"{len(names)} document names for {len(starts)} documents")
    np.asarray(starts, dtype=np.int64).tofile(out / "documents.i64")
    if names is not None:
        (out / "documents.json").write_text(json.dumps(names, ensure_ascii=False) + "\n")
    info = {
        "format": FORMAT,
        "tokens": int(tokens.size),
        "sa_dtype": sa.dtype.name,
        "train_md5": md5_of(prepared / "train.bin"),
    }
    (out / "index.json").write_text(json.dumps(info, indent=2) + "\n")  # the same bytes for the same tokens
    return {**info, "seconds": round(time.perf_counter() - start, 2)}


def md5_of(path: Path, algorithm: str = "md5") -> str:
    """The hex digest of a file, read in blocks (``algorithm``: any of hashlib's; the site's graph uses sha256)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _suffix(dtype: np.dtype) -> str:
    return {"int32": "i32", "int64": "i64"}[np.dtype(dtype).name]


class CopyIndex:
    """The index of a prepared folder, memory-mapped; ``matches(ids)`` gives, for each position of ``ids``, the
    longest span starting there that occurs in the training split."""

    def __init__(self, prepared: str | Path, check: bool = True):
        from pydivsufsort.dll import libdivsufsort, libdivsufsort64

        prepared = Path(prepared)
        folder = prepared / DIR
        fix = f"rebuild it: `penwright prepare` (data.copy_index=true) for {prepared}"
        if not (folder / "index.json").is_file():
            raise PenwrightError(f"{folder}: no copy index here; {fix}")
        self.info = json.loads((folder / "index.json").read_text())
        if check and self.info.get("train_md5") != md5_of(prepared / "train.bin"):
            raise PenwrightError(f"{folder}: built from another train.bin than the one beside it; {fix}")
        dtype = np.dtype(self.info["sa_dtype"])
        self.tokens = self.info["tokens"]
        self.text = _map(folder / "tokens.u8", np.uint8)
        self.sa = _map(folder / f"sa.{_suffix(dtype)}", dtype)
        self.documents = _map(folder / "documents.i64", np.int64)
        names = folder / "documents.json"  # (an index without it names documents by number)
        self.names: list[str] | None = json.loads(names.read_text()) if names.is_file() else None
        wide = dtype == np.int64
        integer = ctypes.c_int64 if wide else ctypes.c_int32
        self._search = libdivsufsort64.sa_search64 if wide else libdivsufsort.sa_search
        # sa_search(text, text size, pattern, pattern size, suffix array, its size, &left) -> count
        self._search.argtypes = [
            ctypes.c_void_p,
            integer,
            ctypes.c_void_p,
            integer,
            ctypes.c_void_p,
            integer,
            ctypes.c_void_p,
        ]
        self._search.restype = integer
        self._left = integer()
        self._left_p = ctypes.addressof(self._left)
        self._text = self.text.ctypes.data if self.text.size else None
        self._sa_p = self.sa.ctypes.data if self.sa.size else None
        self._text_size, self._sa_size = int(self.text.size), int(self.sa.size)

    def _count(self, base: int, start: int, length: int) -> int:
        """How often tokens ``[start, start + length)`` of an encoded pattern at address ``base`` occur
        (``self._left``: the first suffix-array row of them)."""
        count = self._search(
            self._text,
            self._text_size,
            base + start * BYTES_PER_TOKEN,
            length * BYTES_PER_TOKEN,
            self._sa_p,
            self._sa_size,
            self._left_p,
        )
        if count < 0:
            raise PenwrightError(f"libdivsufsort's sa_search failed ({count})")
        return count

    def matches(self, ids) -> np.ndarray:
        """For each position ``i`` of ``ids``, the length of the longest span ``ids[i:i + L]`` found in the training
        split (matching statistics: each length is at least the one before it less one, so each position costs a
        few searches)."""
        ids = _checked(ids)
        lengths = np.zeros(ids.size, dtype=np.int64)
        if not self.sa.size:
            return lengths
        pattern = encode(ids)
        base, count, n = pattern.ctypes.data, self._count, ids.size
        found = [0] * n
        known = 0  # ids[i:i + known] occurs (the span found at i - 1, less its first token)
        for i in range(n):
            low, high, step = max(0, known - 1), n - i, 1  # low occurs; find the longest length that does
            while low < high:  # gallop up; after a miss, step again from 1
                probe = min(high, low + step)
                if count(base, i, probe):
                    low, step = probe, step * 2
                else:
                    high, step = probe - 1, 1
            found[i] = known = low
        lengths[:] = found
        return lengths

    def locate(self, ids, start: int, length: int) -> int:
        """A token position of the training split where ``ids[start:start + length]`` occurs, or -1."""
        ids = _checked(ids)
        if length <= 0 or start < 0 or start + length > ids.size or not self.sa.size:
            return -1
        pattern = encode(ids)
        if not self._count(pattern.ctypes.data, start, length):
            return -1
        return int(self.sa[self._left.value]) // BYTES_PER_TOKEN

    def document_of(self, position: int) -> tuple[int, int]:
        """(training document, token offset in it) of a token position of the training split (an empty document
        begins where the next does: the position is the next one's)."""
        doc = int(np.searchsorted(self.documents, position, side="right")) - 1
        return doc, int(position - self.documents[doc])

    def name_of(self, doc: int) -> str:
        """What training document ``doc`` is called: its file (``#row`` within it), else its number."""
        return self.names[doc] if self.names is not None else f"document {doc}"


def _checked(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise PenwrightError(f"token ids outside the vocabulary: {int(ids.min())}..{int(ids.max())}")
    return ids


def _map(path: Path, dtype) -> np.ndarray:
    if not path.is_file():
        raise PenwrightError(f"{path}: missing; rebuild the index with `penwright prepare`")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class CopyMeasures:
    """How much of one text is copied from the training split."""

    tokens: int  # the text's tokens
    longest: int  # the longest span found verbatim in the training split, in tokens
    longest_chars: int  # ... and in characters
    longest_text: str  # the span itself
    document: int | None  # the training document (its index in the train split) it is found in
    source: str | None  # that document's name: its file (#row within it)
    offset: int | None  # its token offset in that document
    copied_share: float  # the share of the text's tokens inside found spans of at least min_span tokens
    min_span: int

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "longest_text"}


def copy_measures(index: CopyIndex, ids, decode, min_span: int, lengths: np.ndarray | None = None) -> CopyMeasures:
    """The copy measures of a text's ``ids`` (``decode`` turns ids back into text; ``lengths``: ``index.matches(ids)``
    when the caller has them)."""
    ids = np.asarray(ids, dtype=np.int64)
    lengths = index.matches(ids) if lengths is None else lengths
    covered = _covered(lengths, min_span)
    if not ids.size or not lengths.max():
        return CopyMeasures(int(ids.size), 0, 0, "", None, None, None, 0.0, min_span)
    best = int(np.argmax(lengths))
    span = decode(ids[best : best + lengths[best]].tolist())
    doc, offset = index.document_of(index.locate(ids, best, int(lengths[best])))
    share = float(covered.mean())
    source = index.name_of(doc)
    return CopyMeasures(
        int(ids.size), int(lengths[best]), len(span), span, doc, source, offset, round(share, 4), min_span
    )


# -- samples: their measures, their copied spans, and the val baseline ---------------------------------------

BASELINE_WINDOWS = 64  # val windows measured for the baseline
OPEN, CLOSE = "⟦", "⟧"  # around copied spans in markdown


class Copies:
    """The copy index of a prepared folder and the tokenizer that reads samples into its ids."""

    def __init__(self, prepared: str | Path, tokenizer, min_span: int):
        self.prepared, self.tokenizer, self.min_span = Path(prepared), tokenizer, min_span
        self.index = CopyIndex(self.prepared)

    @classmethod
    def open(cls, prepared: str | Path, tokenizer, min_span: int) -> Copies | None:
        """None (and a line saying why) where the folder has no index or another tokenizer than the model's."""
        prepared = Path(prepared)
        if not (prepared / "index" / "index.json").is_file():
            log(f"no copy measures: {prepared} has no copy index (prepare it with data.copy_index=true)")
            return None
        theirs = load_tokenizer(prepared / "tokenizer", fix="rerun `penwright prepare`")
        if theirs.get_vocab() != tokenizer.get_vocab():
            log(f"no copy measures: {prepared} was prepared with another tokenizer than this model's (data.out_dir)")
            return None
        return cls(prepared, tokenizer, min_span)

    def read(self, text: str) -> tuple[CopyMeasures, list[tuple[int, int]]]:
        """``text``'s copy measures and the ``[start, end)`` character ranges of it inside copied spans of at least
        ``min_span`` tokens, from one tokenization and one lookup."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        lengths = self.index.matches(ids)
        measures = copy_measures(self.index, ids, self.tokenizer.decode, self.min_span, lengths)
        spans = [(offsets[start][0], offsets[end - 1][1]) for start, end in _runs(_covered(lengths, self.min_span))]
        return measures, spans

    def measure(self, text: str) -> CopyMeasures:
        return self.read(text)[0]

    def spans(self, text: str) -> list[tuple[int, int]]:
        return self.read(text)[1]

    def mark(self, text: str) -> str:
        """``text`` with each copied span of at least ``min_span`` tokens between ⟦ and ⟧."""
        return marked(text, self.read(text)[1])

    def baseline(self, length: int) -> dict:
        """The measures' summary over windows of ``length`` tokens of the val split (human text, never trained on)."""
        path = self.prepared / "val.bin"
        meta = json.loads((self.prepared / "meta.json").read_text())
        val = np.fromfile(path, dtype=np.dtype(meta["dtype"])) if path.is_file() else np.zeros(0)
        if val.size <= length:
            return {}
        starts = np.linspace(0, val.size - length - 1, num=BASELINE_WINDOWS).astype(int)
        measures = [
            copy_measures(self.index, val[s : s + length], self.tokenizer.decode, self.min_span) for s in starts
        ]
        return summary(measures)


def summary(measures: list[CopyMeasures]) -> dict:
    """Medians and maxima of the measures (what generate.json and the logs show)."""
    if not measures:
        return {}
    longest = [m.longest for m in measures]
    share = [m.copied_share for m in measures]
    return {
        "texts": len(measures),
        "longest_tokens_median": statistics.median(longest),
        "longest_tokens_max": max(longest),
        "copied_share_median": round(statistics.median(share), 4),
        "copied_share_max": round(max(share), 4),
    }


def marked(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each of ``spans`` (character ranges) between ⟦ and ⟧."""
    out, at = [], 0
    for a, b in spans:
        out += [text[at:a], OPEN, text[a:b], CLOSE]
        at = b
    return "".join(out) + text[at:]


def _covered(lengths: np.ndarray, min_span: int) -> np.ndarray:
    """Which positions lie inside a found span of at least ``min_span`` tokens (``lengths``: ``CopyIndex.matches``)."""
    covered = np.zeros(len(lengths), dtype=bool)
    for i in np.flatnonzero(lengths >= min_span):
        covered[i : i + lengths[i]] = True
    return covered


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
