"""Read a corpus as a stream of documents, never holding a whole file in memory.

A corpus is a file or a directory (recursive, sorted, filtered by a glob) of:

* ``.txt`` / ``.md``: one document per file, read in chunks;
* ``.csv``: one document per row of a single-column CSV (or a chosen column), header skipped;
  each row is prefixed with ``csv_prefix`` (``<|startoftext|>``) as gpt-2-simple did;
* ``.jsonl``: one document per record, its text in ``jsonl_field``;
* chat exports (``whatsapp``, ``telegram``, ``messages``, ``sms``: ``prepare.chats``), told apart from documents
  by their content where that is unambiguous (a ``.txt`` that starts with a WhatsApp date line, a ``.json``
  Telegram export, an ``.xml`` SMS backup, a ``.jsonl`` of ``{"messages": [...]}`` records); ``prepare`` turns
  them into conversations (``prepare.chat_corpus``).

Text is UTF-8; a leading BOM is dropped and CRLF (or a lone CR) becomes LF. Every problem is a
``CorpusError`` naming the file, and the line or byte where it applies.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from penwright.core.errors import CorpusError
from penwright.prepare import chats

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
FORMATS = {"text", "csv", "jsonl"}
CHAT_FORMATS = set(chats.FORMATS)

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class CorpusSpec:
    """What to read: the ``data`` config group, as plain values."""

    path: str
    glob: str = "**/*.txt"
    format: str = "auto"
    csv_column: str | None = None
    csv_prefix: str = "<|startoftext|>"
    jsonl_field: str = "text"
    encoding_errors: str = "strict"
    chunk_bytes: int = 1 << 20
    take: str | None = None

    @classmethod
    def from_config(cls, data) -> CorpusSpec:
        """The ``data`` group's values (the schema has checked them: choices, the ``take`` regex, sizes)."""
        return cls(
            path=data.path,
            glob=data.glob,
            format=data.format,
            csv_column=data.csv_column,
            csv_prefix=str(data.csv_prefix or ""),
            jsonl_field=data.jsonl_field,
            encoding_errors=data.encoding_errors,
            chunk_bytes=data.chunk_bytes,
            take=data.take,
        )


@dataclass(frozen=True)
class Source:
    """One corpus file, its format and the number of documents in it."""

    path: Path
    format: str
    documents: int
    size: int
    md5: str


def find_files(spec: CorpusSpec) -> list[tuple[Path, str]]:
    """The corpus files, sorted, with their format. Errors when there is nothing to read."""
    root = Path(spec.path)
    if not root.exists():
        raise CorpusError(
            f"{root}: no such file or directory (data.path). Put your corpus there, or set "
            f"data.path=...; for the sample corpus run `penwright corpus`"
        )
    if root.is_dir():
        files = sorted(p for p in root.glob(spec.glob) if p.is_file() and not _hidden(p.relative_to(root)))
        if not files:
            anything = any(p.is_file() for p in root.rglob("*"))
            what = "is empty" if not anything else f"has no files matching data.glob={spec.glob!r}"
            raise CorpusError(f"{root}: the data directory {what}. Add .txt/.md/.csv/.jsonl files, or change data.glob")
    else:
        files = [root]
    return [(f, _format_of(f, spec)) for f in files]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _format_of(path: Path, spec: CorpusSpec) -> str:
    if spec.format != "auto":
        return spec.format
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "whatsapp" if chats.is_whatsapp(path) else "text"
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "messages" if chats.is_messages(path) else "jsonl"
    if suffix in (".json", ".xml"):
        return chats.detect_format(path)
    raise CorpusError(
        f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}. Name it .txt/.md/.csv/.jsonl "
        f"(or a chat export: .json, .xml), set data.format=text|csv|jsonl|{'|'.join(chats.FORMATS)}, or narrow data.glob"
    )


def scan(spec: CorpusSpec) -> list[Source]:
    """Find, hash and check every corpus file and count its documents, before anything is written.

    Catches empty and binary files, CSV/JSONL problems, and (for text files) bytes that are not UTF-8.
    """
    sources = []
    for path, fmt in find_files(spec):
        size = path.stat().st_size
        md5 = hashlib.md5()
        with open(path, "rb") as f:
            offset = 0
            for block in iter(lambda: f.read(1 << 22), b""):
                nul = block.find(b"\x00")
                if nul >= 0:
                    raise CorpusError(
                        f"{path}: looks like a binary file (NUL byte at byte {offset + nul}), not text. "
                        f"Remove it from the data directory or narrow data.glob"
                    )
                md5.update(block)
                offset += len(block)
        if fmt in CHAT_FORMATS:
            count = len(chats.read_chat(path, fmt))  # reads it all: a damaged export is refused before any work
        elif fmt == "text":
            count = 1
            nonblank = False
            for piece in read_text(path, spec):  # decodes it all: bad UTF-8 is caught before any work
                nonblank = nonblank or bool(piece.strip())
            if not nonblank:
                raise CorpusError(f"{path}: the file is empty (or only whitespace). Remove it or add text")
        elif fmt == "csv":
            count = sum(1 for _ in read_csv(path, spec))
        else:
            count = sum(1 for _ in read_jsonl(path, spec))
        if count == 0 and fmt != "text":
            raise CorpusError(
                f"{path}: the file has no {'rows' if fmt == 'csv' else 'records'} with text. Remove it or add some"
            )
        sources.append(Source(path=path, format=fmt, documents=count, size=size, md5=md5.hexdigest()))
    return sources


def iter_documents(source: Source, spec: CorpusSpec) -> Iterator[Iterator[str]]:
    """Each document of ``source`` as an iterator of text chunks (one chunk for a row or record)."""
    if source.format == "text":
        yield read_text(source.path, spec)
    elif source.format == "csv":
        for text in read_csv(source.path, spec):
            yield iter((spec.csv_prefix + text,))
    else:
        for text in read_jsonl(source.path, spec):
            yield iter((text,))


# -- text files -----------------------------------------------------------------------------------


def read_text(path: Path, spec: CorpusSpec) -> Iterator[str]:
    """Decode ``path`` chunk by chunk: BOM dropped, CRLF/CR to LF, cut only where BPE pieces end.

    A cut falls only where GPT-2's pre-tokenizer always ends a piece (see ``_last_cut``), so
    tokenizing the chunks gives the same ids as tokenizing the whole text.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors=spec.encoding_errors)
    pending = ""
    first = True
    consumed = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(spec.chunk_bytes)
            final = not raw
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError:
                raise _utf8_error(path) from None
            consumed += len(raw)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            text = pending + text
            pending = ""
            if not final and text.endswith("\r"):
                text, pending = text[:-1], "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if final:
                if text:
                    yield text
                return
            cut = _last_cut(text)
            if cut:
                yield text[:cut]
                pending = text[cut:] + pending
            else:
                pending = text + pending
                if len(pending) > 4 * spec.chunk_bytes:  # no whitespace at all in a long stretch
                    yield pending
                    pending = ""


def _last_cut(text: str, window: int = 1 << 16) -> int:
    """Index of the last safe cut in the last ``window`` characters of ``text`` (0 when there is none).

    Safe: after a single newline between non-spaces, or before a single space between non-spaces.
    GPT-2's pattern ends a piece there whatever follows; inside a longer run of whitespace it does
    not ("a.\n\nAnd" is "a", ".", "\n", "\n", "And", but "a.\n\n" alone ends in "\n\n").
    """
    floor = max(0, len(text) - window)
    i = text.rfind("\n", floor + 1, len(text) - 1)
    while i > floor:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", floor + 1, i)
    i = text.rfind(" ", floor + 1, len(text) - 1)
    while i > floor:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", floor + 1, i)
    return 0


def _utf8_error(path: Path) -> CorpusError:
    """Locate the first byte of ``path`` that is not UTF-8 and say what to do."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = line = 0
    with open(path, "rb") as f:
        for raw in iter(lambda: f.read(1 << 20), b""):
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as err:
                bad = offset - held + err.start
                if bad >= offset:
                    line += raw[: bad - offset].count(b"\n")
                return CorpusError(
                    f"{path}: line {line + 1}, byte {bad}: not valid UTF-8 (0x{err.object[err.start]:02x}). "
                    f"Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or set data.encoding_errors=replace"
                )
            offset += len(raw)
            line += raw.count(b"\n")
    return CorpusError(
        f"{path}: ends in the middle of a UTF-8 character. Convert it to UTF-8 or set data.encoding_errors=replace"
    )


# -- CSV and JSONL ----------------------------------------------------------------------------------


def _open_text(path: Path, spec: CorpusSpec):
    return open(path, encoding="utf-8-sig", errors=spec.encoding_errors, newline="")


def read_csv(path: Path, spec: CorpusSpec) -> Iterator[str]:
    """The text of each row (header skipped, blank rows skipped)."""
    try:
        with _open_text(path, spec) as f:
            reader = csv.reader(f)
            header = next((row for row in reader if any(cell.strip() for cell in row)), None)
            if header is None:
                return
            if spec.csv_column is None:
                if len(header) != 1:
                    raise CorpusError(
                        f"{path}: the CSV has {len(header)} columns ({', '.join(map(repr, header))}); "
                        f"choose the text column with data.csv_column=NAME"
                    )
                column = 0
            else:
                if spec.csv_column not in header:
                    raise CorpusError(
                        f"{path}: no column data.csv_column={spec.csv_column!r} in the header "
                        f"({', '.join(map(repr, header))})"
                    )
                column = header.index(spec.csv_column)
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) <= column:
                    raise CorpusError(
                        f"{path}: line {reader.line_num}: the row has {len(row)} fields, the header {len(header)}"
                    )
                text = row[column].replace("\r\n", "\n").replace("\r", "\n").strip()
                if text:
                    yield _take(spec, path, reader.line_num, text)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    except csv.Error as err:
        raise CorpusError(f"{path}: not a valid CSV: {err}") from None


def _take(spec: CorpusSpec, path: Path, line: int, text: str) -> str:
    """``data.take``'s group of a row or record (its whole text when take is unset)."""
    if spec.take is None:
        return text
    match = re.search(spec.take, text, flags=re.DOTALL)
    if match is None or not (match.group(1) or "").strip():
        raise CorpusError(
            f"{path}: line {line}: data.take={spec.take!r} finds no text in {text[:60]!r}; fix the row, or the pattern"
        )
    return match.group(1).strip()


def read_jsonl(path: Path, spec: CorpusSpec) -> Iterator[str]:
    """The ``jsonl_field`` of each record (blank lines skipped)."""
    field = spec.jsonl_field
    try:
        with _open_text(path, spec) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(
                        f"{path}: line {number}, column {err.colno}: not valid JSON ({err.msg.removesuffix(' at')})"
                    ) from None
                if not isinstance(record, dict) or field not in record:
                    have = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                    raise CorpusError(
                        f"{path}: line {number}: the record has no field {field!r} (it has: {have}); "
                        f"set data.jsonl_field=NAME"
                    )
                text = record[field]
                if not isinstance(text, str):
                    raise CorpusError(f"{path}: line {number}: field {field!r} is {type(text).__name__}, not a string")
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                if text.strip():
                    yield _take(spec, path, number, text)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
