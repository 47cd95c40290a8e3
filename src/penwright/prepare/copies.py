"""Verbatim copies: ``prepare`` hashes each document, ``generate.check_copies`` counts samples that match one.

Data flows one way: ``prepare`` writes ``documents.json`` beside ``train.bin`` / ``val.bin`` and
``generate`` reads it, never the corpus. A document's text is compared *normalized*: a leading
``data.csv_prefix`` (``<|startoftext|>``, which ``prepare`` puts in front of each CSV row) removed,
then every run of whitespace collapsed to one space and the ends stripped (``" ".join(text.split())``).
A generated sample is normalized the same way, with the prefix recorded in the file.

``documents.json``::

    {"format_version": 1, "hash": "blake2b-64", "csv_prefix": "<|startoftext|>",
     "train": {"documents": N, "digests": "<base64>"}, "val": {"documents": M, "digests": "<base64>"}}

``digests``: the 8-byte blake2b digests of the split's distinct normalized documents (UTF-8), sorted and
concatenated, base64-encoded; ``documents``: how many (distinct texts, so at most the split's documents).
The same corpus and split give the same bytes. A document is hashed as it streams by, chunk by chunk,
with the same digest as its whole text (``DocumentHasher``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from penwright.core.errors import PenwrightError

DOCUMENTS_FILE = "documents.json"
FORMAT_VERSION = 1
HASH = "blake2b-64"
DIGEST_SIZE = 8
SPLITS = ("train", "val")


def normal(text: str, prefix: str = "") -> str:
    """A text as it is compared: without a leading ``prefix``, whitespace collapsed, ends stripped."""
    if prefix and text.startswith(prefix):
        text = text[len(prefix) :]
    return " ".join(text.split())


def _hash():
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a JSONL record may hold a lone surrogate (\ud800)


def digest(text: str, prefix: str = "") -> bytes:
    """The digest of ``normal(text, prefix)``."""
    h = _hash()
    h.update(_bytes(normal(text, prefix)))
    return h.digest()


# every character str.split() splits on (str.isspace) but the space itself; tests/test_copies.py checks the list
_ASCII_SPACES = ("\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f")
_SPACES = _ASCII_SPACES + (
    "\x85",
    "\xa0",
    "\u1680",
    *map(chr, range(0x2000, 0x200B)),
    "\u2028",
    "\u2029",
    "\u202f",
    "\u205f",
    "\u3000",
)
_SMALL = 4096  # shorter chunks (rows, records): str.split; longer ones (text files): numpy, ~3x faster


def _pieces(chunk: str) -> tuple[bool, bytes, bool]:
    """``(starts with whitespace, the text between in UTF-8 with each whitespace run one space, ends with whitespace)``."""
    if len(chunk) < _SMALL:
        return chunk[:1].isspace(), _bytes(" ".join(chunk.split())), chunk[-1:].isspace()
    for space in _ASCII_SPACES if chunk.isascii() else _SPACES:
        if space in chunk:
            chunk = chunk.replace(space, " ")
    raw = _bytes(chunk)  # no byte of a multi-byte UTF-8 character is 0x20
    codes = np.frombuffer(raw, dtype=np.uint8)
    space = codes == 32
    repeated = space[1:] & space[:-1]
    if repeated.any():
        keep = np.ones(codes.size, dtype=bool)
        np.logical_not(repeated, out=keep[1:])
        raw = codes[keep].tobytes()
    return raw[:1] == b" ", raw.strip(b" "), raw[-1:] == b" "


class DocumentHasher:
    """``digest("".join(chunks), prefix)`` of a document read chunk by chunk (``prepare`` hashes as it tokenizes).

    A short document (a row, a record) is held and hashed whole by ``digest``; a longer one is hashed as
    it streams by, holding nothing.
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix or ""
        self.held = ""  # the text so far, while it is short
        self.hash: Any = None  # once it is not: the digest so far (a hashlib object)
        self.started = False  # some text is hashed
        self.space = False  # whitespace came after it: a space goes before the next text

    def update(self, chunk: str) -> None:
        if self.hash is None:
            self.held += chunk
            if len(self.held) < max(_SMALL, len(self.prefix)):
                return
            chunk, self.held = self.held, ""
            if self.prefix and chunk.startswith(self.prefix):
                chunk = chunk[len(self.prefix) :]
            self.hash = _hash()
        self._feed(chunk)

    def digest(self) -> bytes:
        return digest(self.held, self.prefix) if self.hash is None else self.hash.digest()

    def _feed(self, chunk: str) -> None:
        assert self.hash is not None  # (update makes it before it feeds)
        lead, text, trail = _pieces(chunk)
        if text:
            if self.started and (self.space or lead):
                self.hash.update(b" ")
            self.hash.update(text)
            self.started, self.space = True, trail
        elif lead:  # only whitespace
            self.space = True


def write(directory: Path, digests: Mapping[str, Iterable[bytes]], prefix: str) -> Path:
    """``documents.json`` in ``directory``: each split's distinct digests, sorted."""
    splits = {}
    for split in SPLITS:
        unique = sorted(set(digests.get(split, ())))
        splits[split] = {"documents": len(unique), "digests": base64.b64encode(b"".join(unique)).decode("ascii")}
    doc = {"format_version": FORMAT_VERSION, "hash": HASH, "csv_prefix": prefix or "", **splits}
    path = Path(directory) / DOCUMENTS_FILE
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Documents:
    """Each split's document digests, and the prefix they were normalized without."""

    train: frozenset[bytes]
    val: frozenset[bytes]
    csv_prefix: str = ""

    def count(self, texts: list[str]) -> dict:
        """How many ``texts`` are verbatim copies of training documents, and how many more of validation ones."""
        found = [digest(t, self.csv_prefix) for t in texts if normal(t, self.csv_prefix)]
        copies_train = sum(d in self.train for d in found)
        copies_val = sum(d in self.val and d not in self.train for d in found)
        return {
            "copies_of_train": copies_train,
            "copies_of_val": copies_val,
            "copy_fraction": round((copies_train + copies_val) / max(1, len(texts)), 4),
            "corpus_documents": len(self.train) + len(self.val),
        }


def read(directory: str | Path) -> Documents:
    """The ``documents.json`` ``prepare`` wrote in ``directory``; one line of error when it is missing
    (prepared by an older penwright) or of another format."""
    path = Path(directory) / DOCUMENTS_FILE
    stale = "rerun `penwright prepare` (or `dvc repro prepare`) to write it, or set generate.check_copies=false"
    if not path.is_file():
        raise PenwrightError(f"{path}: not found (prepared by an older penwright, or not prepared); {stale}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format_version") != FORMAT_VERSION or doc.get("hash") != HASH:
            raise ValueError(f"format {doc.get('format_version')!r}, hash {doc.get('hash')!r}")
        splits = {}
        for split in SPLITS:
            raw = base64.b64decode(doc[split]["digests"], validate=True)
            if len(raw) % DIGEST_SIZE or len(raw) // DIGEST_SIZE != doc[split]["documents"]:
                raise ValueError(f"{split}: {len(raw)} bytes of digests for {doc[split]['documents']} documents")
            splits[split] = frozenset(raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE))
        return Documents(splits["train"], splits["val"], str(doc.get("csv_prefix") or ""))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PenwrightError(f"{path}: not a penwright {DOCUMENTS_FILE} ({err}); {stale}") from None
