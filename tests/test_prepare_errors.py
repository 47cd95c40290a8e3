"""Bad input to ``penwright prepare``: the right error, a message that names the culprit, no debris.

Each test builds one bad corpus under ``tmp_path / "corpus"`` and checks

(a) the exception type (``CorpusError`` / ``ConfigError``, both ``PenwrightError``),
(b) the message names the file (and the line / byte / key / value that applies),
(c) nothing is left beside the output: no ``prepared/`` and no ``.prepared.tmp-*`` / ``.prepared.old-*``.

Plus: a failing run leaves a previous successful output byte-identical, the CLI prints one
``error:`` line (exit code 2, no traceback), and BOM + CRLF text gives the same tokens as LF text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from penwright.core.errors import ConfigError, CorpusError, PenwrightError
from penwright.prepare.stage import prepare

GOOD_TEXT = (
    "In the beginning was the word, and the word was written down.\n"
    "The quick brown fox jumps over the lazy dog; the dog did not mind at all.\n"
)


# -- helpers ------------------------------------------------------------------------------------------


def _corpus_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    return d


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _assert_nothing_written(tmp_path: Path, before: list[str]) -> None:
    """No out_dir, no temp or old dir next to it, and the parent holds exactly what it held before."""
    out_dir = tmp_path / "prepared"
    assert not out_dir.exists(), f"{out_dir} was created by a failing prepare"
    leftovers = sorted(p.name for p in tmp_path.glob(".prepared.*"))
    assert leftovers == [], f"temp dirs left behind: {leftovers}"
    assert _listing(tmp_path) == before


def _expect_failure(tmp_path: Path, cfg, exc_type: type[Exception], *fragments: str) -> str:
    """Run prepare(cfg), expecting ``exc_type`` whose message contains every fragment; check no debris."""
    before = _listing(tmp_path)
    with pytest.raises(exc_type) as info:
        prepare(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message:\n{message}"
    _assert_nothing_written(tmp_path, before)
    return message


def _decode_train(out_dir: Path) -> str:
    from transformers import AutoTokenizer

    meta = json.loads((out_dir / "meta.json").read_text())
    ids = np.fromfile(out_dir / "train.bin", dtype=meta["dtype"])
    assert ids.size == meta["train"]["tokens"] > 0
    tok = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
    return tok.decode(ids.tolist())


# -- 1-3: where the corpus should be ------------------------------------------------------------------


def test_missing_data_path(compose_prepare, tmp_path):
    missing = tmp_path / "no_such_corpus"
    _expect_failure(
        tmp_path, compose_prepare(missing), CorpusError, str(missing), "no such file or directory", "data.path"
    )


def test_empty_data_directory(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    _expect_failure(tmp_path, compose_prepare(corpus), CorpusError, str(corpus), "is empty")


def test_no_file_matches_glob(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    (corpus / "a.txt").write_text(GOOD_TEXT)
    (corpus / "b.txt").write_text(GOOD_TEXT)
    message = _expect_failure(
        tmp_path, compose_prepare(corpus, "data.glob=**/*.md"), CorpusError, str(corpus), "data.glob", "**/*.md"
    )
    assert "is empty" not in message


# -- 4-6: text files that are not usable text --------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n   \n"], ids=["zero_bytes", "whitespace_only"])
def test_empty_text_file(compose_prepare, tmp_path, content):
    corpus = _corpus_dir(tmp_path)
    (corpus / "a_good.txt").write_text(GOOD_TEXT)
    bad = corpus / "b_empty.txt"
    bad.write_bytes(content)
    (corpus / "c_good.txt").write_text(GOOD_TEXT)
    message = _expect_failure(tmp_path, compose_prepare(corpus), CorpusError, str(bad), "empty")
    assert "a_good.txt" not in message and "c_good.txt" not in message


def test_binary_file_named_txt(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    (corpus / "a_good.txt").write_text(GOOD_TEXT)
    bad = corpus / "image.txt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(256)))
    _expect_failure(tmp_path, compose_prepare(corpus), CorpusError, str(bad), "binary", "NUL byte at byte 8")


INVALID_UTF8 = (
    b"first line, plain ascii\n"
    + "second line: café, naïve\n".encode()  # valid multi-byte UTF-8 before the bad byte
    + b"third line has a latin-1 \xe9 in its middle\n"
    + b"fourth line is fine\n"
)
BAD_BYTE = INVALID_UTF8.index(b"\xe9 in")


def test_invalid_utf8_names_line_and_byte(compose_prepare, tmp_path):
    assert INVALID_UTF8.count(b"\n", 0, BAD_BYTE) == 2  # the bad byte is on line 3
    corpus = _corpus_dir(tmp_path)
    (corpus / "a_good.txt").write_text(GOOD_TEXT)
    bad = corpus / "latin1.txt"
    bad.write_bytes(INVALID_UTF8)
    _expect_failure(
        tmp_path,
        compose_prepare(corpus),
        CorpusError,
        str(bad),
        "line 3",
        f"byte {BAD_BYTE}",
        "0xe9",
        "data.encoding_errors=replace",
    )


LATE_BODY = ("word " * 19 + "end\n").encode() * 500  # 500 lines of 99 bytes: many 4 KiB chunks
LATE_INVALID = LATE_BODY + b"bad \xff byte\n"


@pytest.mark.parametrize("model", ["pretrained", "scratch_bpe"])
def test_invalid_utf8_after_the_first_chunk(compose_prepare, tmp_path, model):
    # The bad byte is far past the first chunk, so it surfaces only while the tokenizer is being
    # trained / the text tokenized, i.e. once the temp dir exists: it must still be reported and cleaned.
    corpus = _corpus_dir(tmp_path)
    bad = corpus / "late.txt"
    bad.write_bytes(LATE_INVALID)
    overrides = ["data.chunk_bytes=4096"]
    if model == "scratch_bpe":
        overrides += ["model=scratch_small", "model.tokenizer.vocab_size=260"]
    _expect_failure(
        tmp_path,
        compose_prepare(corpus, *overrides),
        CorpusError,
        str(bad),
        "line 501",
        f"byte {len(LATE_BODY) + 4}",
        "0xff",
    )


def test_scan_catches_invalid_utf8_after_the_first_chunk(tmp_path):
    from penwright.prepare.corpus import CorpusSpec, scan

    bad = tmp_path / "late.txt"
    bad.write_bytes(LATE_INVALID)
    with pytest.raises(CorpusError, match="line 501"):
        scan(CorpusSpec(path=str(bad), chunk_bytes=4096))


def test_invalid_utf8_with_replace_gives_replacement_char(compose_prepare, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(INVALID_UTF8)
    out_dir = tmp_path / "prepared"
    meta = prepare(compose_prepare(bad, "data.encoding_errors=replace", "data.val_fraction=0"))
    assert meta["val"]["tokens"] == 0
    text = _decode_train(out_dir)
    assert "third line has a latin-1 \ufffd in its middle" in text
    assert text.count("\ufffd") == 1
    assert "café, naïve" in text


# -- 7: CSV columns -------------------------------------------------------------------------------------

CSV = (
    "id,title,body\n"
    "1,First,The quick brown fox jumps over the lazy dog.\n"
    '2,Second,"In the beginning was the word, and the word was written."\n'
    "3,Third,It's a short text; we'll see.\n"
)


def test_csv_several_columns_and_none_chosen(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    bad = corpus / "rows.csv"
    bad.write_text(CSV)
    _expect_failure(
        tmp_path,
        compose_prepare(corpus, "data.glob=*.csv"),
        CorpusError,
        str(bad),
        "3 columns",
        "'id'",
        "'title'",
        "'body'",
        "data.csv_column",
    )


def test_csv_with_chosen_column_succeeds(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    (corpus / "rows.csv").write_text(CSV)
    meta = prepare(compose_prepare(corpus, "data.glob=*.csv", "data.csv_column=body", "data.val_fraction=0"))
    assert meta["data"]["documents"] == 3
    assert meta["train"]["documents"] == 3
    text = _decode_train(tmp_path / "prepared")
    assert "The quick brown fox jumps over the lazy dog." in text
    assert "In the beginning was the word, and the word was written." in text
    assert "First" not in text and "Second" not in text  # the title column is not read


def test_csv_unknown_column(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    bad = corpus / "rows.csv"
    bad.write_text(CSV)
    _expect_failure(
        tmp_path,
        compose_prepare(corpus, "data.glob=*.csv", "data.csv_column=content"),
        CorpusError,
        str(bad),
        "data.csv_column",
        "'content'",
        "'body'",
    )


# -- 8: JSONL -------------------------------------------------------------------------------------------


def test_jsonl_line_not_json(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    bad = corpus / "records.jsonl"
    bad.write_text(
        '{"text": "The quick brown fox."}\n'
        '{"text": "Jumps over the lazy dog."}\n'
        "\n"
        '{"text": "unterminated string}\n'
        '{"text": "never read"}\n'
    )
    _expect_failure(
        tmp_path, compose_prepare(corpus, "data.glob=*.jsonl"), CorpusError, str(bad), "line 4", "not valid JSON"
    )


def test_jsonl_record_without_field(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    bad = corpus / "records.jsonl"
    bad.write_text(
        '{"content": "The quick brown fox.", "text": "ok"}\n{"content": "Jumps over the lazy dog.", "id": 2}\n'
    )
    _expect_failure(
        tmp_path,
        compose_prepare(corpus, "data.glob=*.jsonl"),
        CorpusError,
        str(bad),
        "line 2",
        "'text'",
        "data.jsonl_field",
        "'content'",
        "'id'",
    )


# -- 9-12: config values ------------------------------------------------------------------------------------


def test_scratch_vocab_larger_than_corpus_allows(compose_prepare, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(GOOD_TEXT * 3)
    cfg = compose_prepare(small, "model=scratch_small", "model.tokenizer.vocab_size=100000")
    # Raised after the temp dir exists (the BPE is trained into it): it must still be removed.
    _expect_failure(tmp_path, cfg, PenwrightError, "model.tokenizer.vocab_size=100000", "or less")


def test_scratch_vocab_too_large_is_config_error(compose_prepare, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(GOOD_TEXT * 3)
    cfg = compose_prepare(small, "model=scratch_small", "model.tokenizer.vocab_size=100000")
    with pytest.raises((ConfigError, CorpusError), match="model.tokenizer.vocab_size"):
        prepare(cfg)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.val_fraction=1.5", "data.val_fraction=1.5"),
        ("data.format=xml", "data.format='xml'"),
        ("data.encoding_errors=ignore", "data.encoding_errors='ignore'"),
        ("model.tokenizer.type=wordpiece", "model.tokenizer.type='wordpiece'"),
    ],
)
def test_bad_config_value(compose_prepare, tmp_path, override, fragment):
    good = tmp_path / "good.txt"
    good.write_text(GOOD_TEXT)
    with pytest.raises(ConfigError, match="allowed:") as err:  # refused while composing: before any stage runs
        compose_prepare(good, override)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_override_key_suggests_the_real_one(repo, tmp_path):
    from penwright.core.config import compose

    with pytest.raises(ConfigError) as info:
        compose([f"data.path={tmp_path}", "data.val_fractoin=0.1"], config_dir=repo / "conf")
    message = str(info.value)
    assert "data.val_fractoin" in message
    assert "Did you mean: data.val_fraction" in message
    assert list(tmp_path.iterdir()) == []


def test_unknown_suffix(compose_prepare, tmp_path):
    corpus = _corpus_dir(tmp_path)
    (corpus / "a_good.txt").write_text(GOOD_TEXT)
    bad = corpus / "notes.xyz"
    bad.write_text(GOOD_TEXT)
    _expect_failure(tmp_path, compose_prepare(corpus, "data.glob=*"), CorpusError, str(bad), "'.xyz'", "data.format")


# -- a failure keeps the previous output -------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["corpus_error_in_scan", "error_after_temp_dir"])
def test_failing_prepare_keeps_previous_output(compose_prepare, tmp_path, failure):
    corpus = _corpus_dir(tmp_path)
    (corpus / "a.txt").write_text(GOOD_TEXT)
    (corpus / "b.txt").write_text(GOOD_TEXT.upper())
    out_dir = tmp_path / "prepared"
    prepare(compose_prepare(corpus))
    files = ["meta.json", "train.bin", "val.bin", "tokenizer/tokenizer.json"]
    before = {name: (out_dir / name).read_bytes() for name in files}
    assert len(before["train.bin"]) > 0
    listing = _listing(tmp_path)

    if failure == "corpus_error_in_scan":
        (corpus / "c.txt").write_bytes(b"ok so far\n\xff\xfe broken\n")
        overrides = ()
        exc_type = CorpusError
    else:  # the BPE cannot reach the vocab size: raised once the temp dir is in use
        overrides = ("model=scratch_small", "model.tokenizer.vocab_size=100000")
        exc_type = PenwrightError
    with pytest.raises(exc_type):
        prepare(compose_prepare(corpus, *overrides, out_dir=out_dir))

    after = {name: (out_dir / name).read_bytes() for name in files}
    assert after == before
    assert sorted(p.name for p in tmp_path.glob(".prepared.*")) == []
    expected = listing + (["corpus/c.txt"] if failure == "corpus_error_in_scan" else [])
    assert _listing(tmp_path) == sorted(expected)


# -- 13: the CLI ---------------------------------------------------------------------------------------


def test_cli_prints_one_error_line_and_exits_2(repo, tmp_path):
    missing = tmp_path / "no_such_corpus"
    out_dir = tmp_path / "prepared"
    result = subprocess.run(
        [sys.executable, "-m", "penwright.cli", "prepare", f"data.path={missing}", f"data.out_dir={out_dir}"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(missing) in lines[0] and "data.path" in lines[0]
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


# -- normalization ---------------------------------------------------------------------------------------


def test_bom_and_crlf_give_the_same_tokens_as_lf(compose_prepare, tmp_path):
    text = "First line of the text.\nSecond line, with a comma.\n\nA paragraph after a blank line.\nEnd\n"
    assert "\r" not in text
    lf = tmp_path / "lf.txt"
    lf.write_bytes(text.encode("utf-8"))
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert crlf.read_bytes() != lf.read_bytes()

    out_lf, out_crlf = tmp_path / "out_lf", tmp_path / "out_crlf"
    prepare(compose_prepare(lf, "data.val_fraction=0", out_dir=out_lf))
    prepare(compose_prepare(crlf, "data.val_fraction=0", out_dir=out_crlf))
    train_lf = (out_lf / "train.bin").read_bytes()
    assert len(train_lf) > 0
    assert (out_crlf / "train.bin").read_bytes() == train_lf
    decoded = _decode_train(out_crlf)
    assert decoded.startswith("First line") and "\r" not in decoded and "\ufeff" not in decoded


def test_pretrained_tokenizer_offline_fails_fast_and_says_how_to_point_at_a_dir(tmp_path, repo):
    """No local dir, no cache, hub unreachable (HF_HUB_OFFLINE=1): one clear error, nothing written."""
    from penwright.core.config import compose

    corpus = tmp_path / "c.txt"
    corpus.write_text(GOOD_TEXT)
    cfg = compose(
        [
            f"data.path={corpus}",
            f"data.out_dir={tmp_path / 'prepared'}",
            "model=gpt2",
            "model.name_or_path=no-such-model-penwright-test",
        ],
        config_dir=repo / "conf",
    )
    _expect_failure(
        tmp_path, cfg, PenwrightError, "no-such-model-penwright-test", "not reachable", "model.name_or_path=DIR"
    )
