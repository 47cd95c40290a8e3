"""generate.check_copies reads what prepare wrote (documents.json), never the corpus, and counts as before."""

from __future__ import annotations

import json
import random

import pytest

from penwright.core.errors import PenwrightError
from penwright.generate.stage import Sample, count_copies
from penwright.prepare import copies

PREFIX = "<|startoftext|>"


def test_the_whitespace_list_is_what_str_split_splits_on():
    assert set(copies._SPACES) | {" "} == {c for c in map(chr, range(0x110000)) if c.isspace()}
    assert set(copies._ASCII_SPACES) == {c for c in copies._SPACES if c.isascii()}


def test_a_document_hashed_chunk_by_chunk_has_the_digest_of_its_whole_text():
    rng = random.Random(0)
    pieces = [
        "word",
        "naïve",
        "日本語",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "\u3000",
        "\x1c",
        "\xa0",
        PREFIX,
        "<|",
        "a b",
        "\ud800",
    ]
    texts = ["", " ", PREFIX, PREFIX[:5], PREFIX + " x ", " " + PREFIX + "x", "x" + PREFIX]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    # long enough for the numpy path (chunks of 4096 characters and more), ASCII and not
    ascii_pieces = [p for p in pieces if p.isascii()]
    texts += [
        "".join(rng.choice(ascii_pieces if i % 2 else pieces) for _ in range(rng.randint(2000, 9000)))
        for i in range(12)
    ]
    for text in texts:
        for prefix in ("", PREFIX, "a b"):
            whole = copies.digest(text, prefix)
            assert whole == copies.digest(copies.normal(text, prefix))  # normalizing twice changes nothing
            for _ in range(4):
                cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 5))))
                hasher = copies.DocumentHasher(prefix)
                for a, b in zip([0, *cuts], [*cuts, len(text)]):
                    hasher.update(text[a:b])
                assert hasher.digest() == whole, (text, prefix, cuts)


def test_prepare_writes_each_splits_document_hashes_and_generate_counts_copies_from_them(tmp_path, compose_prepare):
    from penwright.prepare.stage import documents_by_split, prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [f"Row {i}:  the  fox\tran   to the hill {i}." for i in range(40)]
    (corpus / "rows.csv").write_text("text\n" + "\n".join(f'"{r}"' for r in rows) + "\n")
    long = " ".join(f"word{i}" + ("\r\n\r\n" if i % 50 == 0 else "  ") for i in range(3000))  # several 4 KB chunks
    (corpus / "long.txt").write_text(long, newline="")
    (corpus / "prefixed.jsonl").write_text(
        json.dumps({"text": PREFIX + "A record  that begins\nwith the prefix."})
        + "\n"
        + json.dumps({"text": "Another record."})
        + "\n"
    )
    glob = "data.glob='**/*'"
    cfg = compose_prepare(corpus, glob, "data.val_fraction=0.3", "data.chunk_bytes=4096")
    prepare(cfg)
    path = tmp_path / "prepared" / copies.DOCUMENTS_FILE
    written = path.read_bytes()
    documents = copies.read(tmp_path / "prepared")
    expected = {False: set(), True: set()}
    for is_val, text in documents_by_split(cfg.data):
        expected[is_val].add(copies.digest(text, PREFIX))
    assert documents.train == expected[False] and documents.val == expected[True]
    assert documents.csv_prefix == PREFIX and len(documents.train) + len(documents.val) == len(rows) + 3

    # deterministic: the same corpus gives the same bytes (dvc repro stays reproducible)
    prepare(
        compose_prepare(corpus, glob, "data.val_fraction=0.3", "data.chunk_bytes=65536", out_dir=tmp_path / "again")
    )
    assert (tmp_path / "again" / copies.DOCUMENTS_FILE).read_bytes() == written

    # the count needs the prepared directory alone
    (corpus / "rows.csv").unlink()
    train_rows = [r for r in rows if copies.digest(PREFIX + r, PREFIX) in documents.train]
    val_rows = [r for r in rows if copies.digest(PREFIX + r, PREFIX) in documents.val]
    known = [
        Sample("", " ".join(train_rows[0].split())),
        Sample("", f"  {train_rows[1]}\n"),
        Sample("", PREFIX + val_rows[0]),
        Sample("", ""),
        Sample("", "Row 1: the fox"),
    ]
    assert count_copies(known, tmp_path / "prepared") == {
        "copies_of_train": 2,
        "copies_of_val": 1,
        "copy_fraction": 0.6,
        "corpus_documents": len(rows) + 3,
    }
    # a whole text file (read in chunks), and a record that began with the prefix (compared without it)
    for text in (long.replace("\r\n", "\n"), "A record that begins with the prefix."):
        found = count_copies([Sample("", text)], documents)
        assert found["copies_of_train"] + found["copies_of_val"] == 1, text[:40]


def test_a_prepared_dir_without_document_hashes_says_to_rerun_prepare(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(PenwrightError, match=r"documents.json: not found .*rerun `penwright prepare`") as err:
        count_copies([Sample("", "text")], tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / copies.DOCUMENTS_FILE).write_text('{"format_version": 0}')
    with pytest.raises(PenwrightError, match=r"not a penwright documents.json .*rerun `penwright prepare`"):
        count_copies([Sample("", "text")], tmp_path)
