"""The prepare stage on every input format, against references: the whole-text tokenization, the split rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer

from helpers.paths import ENGLISH
from penwright.prepare.corpus import CorpusSpec, read_text
from penwright.prepare.stage import dtype_for, prepare, split_documents
from penwright.train.data import TokenWindows, load_tokens


def _outputs(meta_dir: Path):
    meta = json.loads((meta_dir / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(meta_dir / "tokenizer")
    train = np.fromfile(meta_dir / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(meta_dir / "val.bin", dtype=meta["dtype"])
    return meta, tok, train, val


def _docs(ids: np.ndarray, eos: int) -> list[list[int]]:
    """Split a token stream at EOS ids (each document ends with exactly one)."""
    assert ids.size == 0 or ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    out, start = [], 0
    for c in cuts:
        out.append(ids[start:c].tolist())
        start = c + 1
    return out


def _write_books(root: Path, n: int) -> list[str]:
    texts = []
    for i in range(n):
        text = f"Book {i}. " + ENGLISH * (1 + i % 3)
        sub = root / ("part-b" if i % 2 else "part-a")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:02d}.txt").write_text(text)
        texts.append(text)
    return texts


def test_directory_recursive_sorted_one_document_per_file(tmp_path, compose_prepare):
    corpus = tmp_path / "corpus"
    _write_books(corpus, 6)
    (corpus / "part-a" / "notes.md").write_text("# not matched by the default glob\n")
    meta = prepare(compose_prepare(corpus, "data.val_fraction=0"))
    _, tok, train, val = _outputs(tmp_path / "prepared")
    eos = tok.eos_token_id
    files = sorted(p for p in corpus.glob("**/*.txt"))
    assert meta["data"]["files"] == 6 and meta["train"]["documents"] == 6 and val.size == 0
    docs = _docs(train, eos)
    assert docs == [tok(p.read_text(), add_special_tokens=False)["input_ids"] for p in files]


def test_glob_selects_markdown(tmp_path, compose_prepare):
    corpus = tmp_path / "corpus"
    _write_books(corpus, 2)
    (corpus / "a.md").write_text("# Title\n\nSome *markdown* prose.\n")
    meta = prepare(compose_prepare(corpus, "data.glob=**/*.md", "data.val_fraction=0"))
    assert meta["data"]["files"] == 1 and meta["train"]["documents"] == 1


def test_eos_joins_documents_as_one_token(tmp_path, compose_prepare):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("First document.")
    (corpus / "b.txt").write_text("Second document.<|endoftext|>")  # already closed: no second EOS
    prepare(compose_prepare(corpus, "data.val_fraction=0"))
    _, tok, train, _ = _outputs(tmp_path / "prepared")
    eos = tok.eos_token_id
    assert len(tok("<|endoftext|>", add_special_tokens=False)["input_ids"]) == 1
    assert train.tolist() == (
        tok("First document.", add_special_tokens=False)["input_ids"]
        + [eos]
        + tok("Second document.", add_special_tokens=False)["input_ids"]
        + [eos]
    )
    assert int((train == eos).sum()) == 2


def test_csv_rows_are_wrapped_short_texts(tmp_path, compose_prepare):
    path = tmp_path / "titles.csv"
    rows = ["A title", "Another, with a comma", 'And "quoted"\nover two lines']
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["title"])
        w.writerows([[r] for r in rows])
        w.writerow([""])  # blank rows are skipped
    meta = prepare(compose_prepare(path, "data.val_fraction=0"))
    _, tok, train, _ = _outputs(tmp_path / "prepared")
    assert meta["train"]["documents"] == 3
    text = tok.decode(train.tolist())
    assert text == "".join(f"<|startoftext|>{r}<|endoftext|>" for r in rows)


def test_csv_column_choice(tmp_path, compose_prepare):
    path = tmp_path / "two.csv"
    path.write_text("id,body\n1,first body\n2,second body\n")
    prepare(compose_prepare(path, "data.csv_column=body", "data.val_fraction=0", "data.csv_prefix="))
    _, tok, train, _ = _outputs(tmp_path / "prepared")
    assert tok.decode(train.tolist()) == "first body<|endoftext|>second body<|endoftext|>"


def test_jsonl_field(tmp_path, compose_prepare):
    path = tmp_path / "wp.jsonl"
    records = [{"id": 1, "content": "[WP] A prompt [RESPONSE] A story."}, {"id": 2, "content": "Second record."}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    meta = prepare(compose_prepare(path, "data.jsonl_field=content", "data.val_fraction=0"))
    _, tok, train, _ = _outputs(tmp_path / "prepared")
    assert meta["train"]["documents"] == 2
    assert tok.decode(train.tolist()) == "".join(r["content"] + "<|endoftext|>" for r in records)


def test_split_is_by_document_seeded_and_stable(tmp_path, compose_prepare):
    corpus = tmp_path / "corpus"
    _write_books(corpus, 20)
    m1 = prepare(compose_prepare(corpus, "data.val_fraction=0.2", out_dir=tmp_path / "a"))
    m2 = prepare(compose_prepare(corpus, "data.val_fraction=0.2", out_dir=tmp_path / "b"))
    m3 = prepare(compose_prepare(corpus, "data.val_fraction=0.2", "data.split_seed=7", out_dir=tmp_path / "c"))
    assert (m1["train"]["documents"], m1["val"]["documents"]) == (16, 4)
    assert m2["val"] == m1["val"] and m2["train"] == m1["train"]
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    _, tok, train, val = _outputs(tmp_path / "a")
    files = sorted(corpus.glob("**/*.txt"))
    whole = [tok(p.read_text(), add_special_tokens=False)["input_ids"] for p in files]
    got = _docs(train, tok.eos_token_id) + _docs(val, tok.eos_token_id)
    assert sorted(map(tuple, got)) == sorted(map(tuple, whole))  # every document, whole, on one side
    assert m1["train"]["tokens"] + m1["val"]["tokens"] == m3["train"]["tokens"] + m3["val"]["tokens"]


def test_split_documents_rules():
    assert split_documents(1, 0.5, 0).sum() == 0
    assert split_documents(2, 0.01, 0).sum() == 1  # at least one val document
    assert split_documents(3, 0.99, 0).sum() == 2  # at least one train document
    assert split_documents(100, 0.0, 0).sum() == 0
    assert (split_documents(1000, 0.1, 3) == split_documents(1000, 0.1, 3)).all()


def test_single_document_splits_by_token_range(tmp_path, compose_prepare):
    path = tmp_path / "one.txt"
    path.write_text(ENGLISH * 10)
    meta = prepare(compose_prepare(path, "data.val_fraction=0.1"))
    _, tok, train, val = _outputs(tmp_path / "prepared")
    whole = tok(ENGLISH * 10, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert meta["split"]["by"] == "tokens"
    assert train.tolist() + val.tolist() == whole
    assert val.size == round(len(whole) * 0.1)
    assert meta["val"]["tokens"] == val.size and meta["train"]["tokens"] == train.size
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == len((ENGLISH * 10).encode())


def test_tiny_corpus_shorter_than_a_block_is_accepted_and_repeated(tmp_path, compose_prepare, capsys):
    path = tmp_path / "passage.txt"
    passage = "The rain fell all night. In the morning the river had risen. Nobody spoke of it."
    path.write_text(passage)
    meta = prepare(compose_prepare(path, "data.val_fraction=0"))
    tokens = load_tokens(tmp_path / "prepared", "train")
    assert meta["train"]["tokens"] == tokens.size < 64
    windows = TokenWindows(tokens, block_size=64, name="train")
    assert windows.repeated and len(windows) == 1
    assert "repeated" in capsys.readouterr().err
    window = windows[0]
    assert window.size == 65
    n = tokens.size
    assert window[:n].tolist() == tokens.tolist() and window[n : 2 * n].tolist() == tokens[: min(n, 65 - n)].tolist()


def test_chunked_reading_equals_whole_text_tokenization(tmp_path, compose_prepare, repo):
    """Cutting text into chunks must not change a single id (cuts fall where BPE pieces end)."""
    paragraph = "The people went out. And they said, Let us go.\n\nAnd it came to pass;\n \nthat day.\n"
    text = (ENGLISH + paragraph + "  two  spaces\n\n\nthree newlines\tand tabs — ünïcödé 日本語\n") * 400
    path = tmp_path / "long.txt"
    path.write_text(text)
    spec = CorpusSpec(path=str(path), chunk_bytes=4096)
    chunks = list(read_text(path, spec))
    assert len(chunks) > 10 and "".join(chunks) == text
    pieces = ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    assert [p for c in chunks for p, _ in pieces(c)] == [p for p, _ in pieces(text)]
    prepare(compose_prepare(path, "data.val_fraction=0", "data.chunk_bytes=4096", out_dir=tmp_path / "small"))
    prepare(compose_prepare(path, "data.val_fraction=0", "data.chunk_bytes=1048576", out_dir=tmp_path / "big"))
    _, tok, train, _ = _outputs(tmp_path / "small")
    assert (tmp_path / "small" / "train.bin").read_bytes() == (tmp_path / "big" / "train.bin").read_bytes()
    assert train.tolist() == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_fast_encoder_gives_the_tokenizers_ids(tmp_path, compose_prepare):
    corpus = tmp_path / "corpus"
    _write_books(corpus, 4)
    (corpus / "part-a" / "odd.txt").write_text("Ünïcödé — naïve café 🙂 it's we'll <|endoftext|> 12,345\r\n tabs\t!")
    fast = prepare(compose_prepare(corpus, "data.fast_encode=true", out_dir=tmp_path / "fast"))
    slow = prepare(compose_prepare(corpus, "data.fast_encode=false", out_dir=tmp_path / "slow"))
    assert fast["tokenizer"]["encoder"] == "splintr" and slow["tokenizer"]["encoder"] == "tokenizers"
    for split in ("train", "val"):
        assert (tmp_path / "fast" / f"{split}.bin").read_bytes() == (tmp_path / "slow" / f"{split}.bin").read_bytes()


def test_background_encoder_gives_the_same_bytes_in_order_and_ends(tmp_path, compose_prepare):
    """The fast encoder works on a batch while the stage reads the next: the output must not change by a byte."""
    import threading

    corpus = tmp_path / "corpus"
    for i in range(30):  # 30 documents on both sides of the split, several batches of 4 KB chunks
        (corpus / f"{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (corpus / f"{i:02d}.txt").write_text(f"Document {i}: " + ENGLISH * (12 + i % 7) + " café 🙂\n\n  end.\n")
    runs = {"fast": ["data.fast_encode=true"], "hf": ["data.fast_encode=false"]}
    metas = {
        k: prepare(compose_prepare(corpus, "data.chunk_bytes=4096", "data.val_fraction=0.2", *o, out_dir=tmp_path / k))
        for k, o in runs.items()
    }
    assert metas["fast"]["tokenizer"]["encoder"] == "splintr" and metas["hf"]["tokenizer"]["encoder"] == "tokenizers"
    from penwright.prepare.stage import BATCH_CHUNKS

    assert metas["fast"]["val"]["documents"] == 6 and metas["fast"]["data"]["bytes"] > 3 * BATCH_CHUNKS * 4096
    for split in ("train", "val"):
        assert (tmp_path / "fast" / f"{split}.bin").read_bytes() == (tmp_path / "hf" / f"{split}.bin").read_bytes()
    assert not [t for t in threading.enumerate() if t.name.startswith("penwright-encode")]  # ended with the stage


def test_fast_encoder_only_for_tokenizers_it_encodes_alike():
    """The gate: a normalizer or a template would make splintr's ids differ, so those get no fast encoder."""
    from tokenizers import normalizers, processors

    from penwright.prepare.tokenizer import fast_encoder, train_bpe

    tok = train_bpe([ENGLISH * 4], 300)
    with fast_encoder(tok) as fast:
        assert fast([ENGLISH])[0].tolist() == tok(ENGLISH, add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    assert fast_encoder(tok) is None
    tok = train_bpe([ENGLISH * 4], 300)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.eos_token_id)]
    )
    assert fast_encoder(tok) is None


def test_an_encoder_failure_falls_back_to_tokenizers_and_ends_its_thread(monkeypatch):
    import penwright.prepare.stage
    from penwright.prepare.stage import choose_encoder
    from penwright.prepare.tokenizer import BatchEncoder, train_bpe

    made = []

    def failing(texts):
        raise ValueError("simulated encoder failure")

    def failing_encoder(tokenizer):
        made.append(BatchEncoder(failing))
        return made[-1]

    monkeypatch.setattr(penwright.prepare.stage, "fast_encoder", failing_encoder)
    tok = train_bpe([ENGLISH * 4], 300)
    name, encode = choose_encoder(tok, [ENGLISH], fast=True)
    assert name == "tokenizers" and encode([ENGLISH])[0] == tok(ENGLISH, add_special_tokens=False)["input_ids"]
    with pytest.raises(RuntimeError, match="shutdown"):  # closed: it takes no more work
        made[0].submit([ENGLISH])


def test_scratch_bpe_is_trained_saved_and_loadable(tmp_path, compose_prepare):
    corpus = tmp_path / "corpus"
    _write_books(corpus, 8)
    meta = prepare(compose_prepare(corpus, "model=scratch_small", "model.tokenizer.vocab_size=300"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "prepared" / "tokenizer")
    assert len(tok) == meta["vocab_size"] == 300
    assert tok.convert_tokens_to_ids("<|endoftext|>") == meta["eos_token_id"]
    assert len(tok("<|startoftext|>", add_special_tokens=False)["input_ids"]) == 1
    assert meta["tokenizer"]["type"] == "bpe" and meta["dtype"] == "uint16"
    text = "It's a short text, we'll see."
    assert tok.decode(tok(text)["input_ids"]) == text
    again = prepare(
        compose_prepare(corpus, "model=scratch_small", "model.tokenizer.vocab_size=300", out_dir=tmp_path / "again")
    )
    assert again["tokenizer"]["md5"] == meta["tokenizer"]["md5"]  # the same BPE, run after run
    assert (tmp_path / "again" / "train.bin").read_bytes() == (tmp_path / "prepared" / "train.bin").read_bytes()


def test_dtype_follows_vocab_size():
    assert dtype_for(50257) == np.uint16 and dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32


def test_meta_counts_and_hashes(tmp_path, compose_prepare):
    corpus = tmp_path / "corpus"
    _write_books(corpus, 5)
    meta = prepare(compose_prepare(corpus, "data.val_fraction=0.2"))
    size = sum(p.stat().st_size for p in corpus.glob("**/*.txt"))
    assert meta["data"]["bytes"] == size == meta["train"]["bytes"] + meta["val"]["bytes"]
    assert meta["train"]["documents"] + meta["val"]["documents"] == 5
    again = prepare(compose_prepare(corpus, "data.val_fraction=0.2", out_dir=tmp_path / "again"))
    assert again["data"]["md5"] == meta["data"]["md5"] and again["tokenizer"]["md5"] == meta["tokenizer"]["md5"]
    (corpus / "part-a" / "00.txt").write_text("changed")
    changed = prepare(compose_prepare(corpus, "data.val_fraction=0.2", out_dir=tmp_path / "changed"))
    assert changed["data"]["md5"] != meta["data"]["md5"]


def test_rerun_replaces_the_output_atomically(tmp_path, compose_prepare):
    corpus = tmp_path / "corpus"
    _write_books(corpus, 3)
    prepare(compose_prepare(corpus))
    prepare(compose_prepare(corpus, "data.val_fraction=0"))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")]
    assert leftovers == []
    assert json.loads((tmp_path / "prepared" / "meta.json").read_text())["val"]["tokens"] == 0


@pytest.mark.parametrize("block", [1, 8])
def test_token_windows_cover_the_stream(block):
    tokens = np.arange(50, dtype=np.uint16)
    w = TokenWindows(tokens, block_size=block)
    assert len(w) == (50 - (block + 1)) // block + 1
    assert w[1].tolist() == list(range(block, 2 * block + 1))
