"""The copy index (prepare/copy_index.py) against brute force: on many random small corpora, the longest span found
at every position of a query, and where it is found, equal a direct search; a stale index is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from penwright.core.copy_index import CopyIndex, build, copy_measures
from penwright.core.errors import PenwrightError


def index_of(root: Path, tokens: np.ndarray, eos: int = 0) -> CopyIndex:
    root.mkdir(parents=True, exist_ok=True)
    tokens.astype(np.uint16).tofile(root / "train.bin")
    build(root, tokens.astype(np.uint16), eos=eos, vocab_size=int(tokens.max(initial=0)) + 1, max_gib=1)
    return CopyIndex(root)


def brute_force(corpus: list[int], query: list[int]) -> list[int]:
    """For each position of query, the longest prefix of query[i:] that occurs in corpus."""
    out = []
    for i in range(len(query)):
        best = 0
        for start in range(len(corpus)):
            n = 0
            while i + n < len(query) and start + n < len(corpus) and corpus[start + n] == query[i + n]:
                n += 1
            best = max(best, n)
        out.append(best)
    return out


@settings(max_examples=150, deadline=None)
@given(
    corpus=st.lists(st.integers(0, 4), min_size=0, max_size=60),
    query=st.lists(st.integers(0, 5), min_size=0, max_size=25),
    big=st.booleans(),
)
def test_longest_spans_and_their_places_equal_brute_force(tmp_path_factory, corpus, query, big):
    shift = 70_000 if big else 0  # ids past 16 bits use all three bytes of each token
    c = np.array(corpus, dtype=np.int64) + shift
    q = np.array(query, dtype=np.int64) + shift
    root = tmp_path_factory.mktemp("idx")
    c.astype(np.uint32).tofile(root / "train.bin")
    build(root, c, eos=-1, vocab_size=shift + 8, max_gib=1)
    index = CopyIndex(root)
    lengths = index.matches(q)
    assert lengths.tolist() == brute_force(corpus, query)
    for i, n in enumerate(lengths):
        at = index.locate(q, i, int(n))
        if n:
            assert c[at : at + n].tolist() == q[i : i + n].tolist()
        else:
            assert at == -1
        assert index.locate(q, i, int(n) + 1) == -1  # n is the longest


def test_a_pasted_passage_reports_its_length_and_document(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 500, size=n) for n in (200, 300, 250)]
    tokens = np.concatenate([np.append(d, 0) for d in docs])  # each document ends with EOS (0)
    index = index_of(tmp_path / "p", tokens)
    pasted = np.concatenate([rng.integers(500, 600, size=10), docs[1][40:90], rng.integers(500, 600, size=10)])
    m = copy_measures(index, pasted, lambda ids: " ".join(map(str, ids)), min_span=8)
    assert (m.longest, m.document, m.offset) == (50, 1, 40)
    assert m.copied_share == pytest.approx(50 / 70, abs=1e-4)
    assert m.longest_text == " ".join(map(str, docs[1][40:90]))


def test_a_copied_span_names_the_file_it_comes_from(tmp_path, compose_prepare, tiny_gpt2):
    """The index's documents are prepare's documents, named by file (and row): one holding ``<|endoftext|>`` in
    its text does not shift the names of those after it."""
    from transformers import AutoTokenizer

    from penwright.core.copy_index import Copies
    from penwright.prepare.stage import prepare

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    words = "amber basalt cedar dune ember fjord garnet heron iris jasper kelp lichen moss nectar onyx".split()
    pieces = {f"{k:02d}.txt": [" ".join(words[k:] + words[:k]) + f" file {k}."] for k in range(8)}
    pieces["03.txt"] = ["before <|endoftext|> after, " + pieces["03.txt"][0]]  # a document with EOS inside it
    pieces["sub/rows.jsonl"] = ["first row of the rows file", "second row: quartz rhyolite slate and tuff"]
    for name, texts in pieces.items():
        lines = [json.dumps({"text": t}) for t in texts] if name.endswith(".jsonl") else texts
        (corpus / name).write_text("\n".join(lines) + "\n")
    cfg = compose_prepare(corpus, "data.glob=**/*", "data.val_fraction=0.2", "data.split_seed=3")
    prepare(cfg)
    copies = Copies(cfg.data.out_dir, AutoTokenizer.from_pretrained(tiny_gpt2), 4)
    names = copies.index.names
    assert names is not None and len(names) == len(copies.index.documents) and "sub/rows.jsonl#2" in names
    checked = 0
    for name, texts in pieces.items():
        for row, text in enumerate(texts):
            shown = f"{name}#{row + 1}" if len(texts) > 1 else name
            if shown not in names:
                continue  # (in val)
            m = copies.measure(text.split("<|endoftext|>")[-1])
            assert m.source == shown and names[m.document] == shown, (shown, m)
            assert m.offset == (0 if name != "03.txt" else len(copies.tokenizer.encode("before <|endoftext|>")))
            checked += 1
    assert checked == len(names) == 10 - 2  # 10 documents, 2 in val


def test_a_stale_index_is_refused_and_bad_ids_are_named(tmp_path):
    tokens = np.arange(1, 50, dtype=np.int64)
    index_of(tmp_path / "s", tokens)
    (tmp_path / "s" / "train.bin").write_bytes(np.arange(2, 60, dtype=np.uint16).tobytes())
    with pytest.raises(PenwrightError, match="built from another train.bin.*penwright prepare"):
        CopyIndex(tmp_path / "s")
    with pytest.raises(PenwrightError, match="no copy index here"):
        CopyIndex(tmp_path)
    with pytest.raises(PenwrightError, match="outside the vocabulary"):
        CopyIndex(tmp_path / "s", check=False).matches([-1, 3])


def test_a_corpus_too_large_for_the_budget_is_refused_before_any_work(tmp_path):
    with pytest.raises(PenwrightError, match=r"needs about .* GiB .*data.copy_index_max_gib"):
        build(tmp_path, np.zeros(10_000_000, dtype=np.uint16), eos=0, vocab_size=10, max_gib=0.01)
    assert not (tmp_path / "index").exists()


def test_generate_reports_each_samples_copies_beside_the_val_baseline(tmp_path, prepared_tiny, onnx_tiny, tiny_gpt2):
    """The generate stage on the tiny model with the tiny corpus's index: every sample carries its measures,
    generate.json their summary and the val split's, the markdown marks copied spans; a pasted training
    passage is found whole."""
    import json

    from transformers import AutoTokenizer

    from helpers.paths import ENGLISH, REPO
    from penwright.core.config import compose
    from penwright.core.copy_index import Copies
    from penwright.generate.stage import generate

    cfg = compose(
        [
            f"generate.model_dir={onnx_tiny}",
            f"data.out_dir={prepared_tiny}",
            f"generate.destination={tmp_path / 'samples.md'}",
            f"generate.report={tmp_path / 'generate.json'}",
            "generate.prompts=[The]",
            "generate.max_new_tokens=16",
            "generate.copy_min_span=4",
        ],
        config_dir=REPO / "conf",
    )
    samples = generate(cfg)
    assert all(s.copies is not None and s.copies.tokens > 0 for s in samples)
    report = json.loads((tmp_path / "generate.json").read_text())["copies"]
    assert report["min_span"] == 4 and report["texts"] == len(samples)
    assert report["val_baseline"]["texts"] == 64
    assert "copied: longest span" in (tmp_path / "samples.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    copies = Copies(prepared_tiny, tokenizer, min_span=4)
    passage = ENGLISH.strip().split("\n")[0]
    pasted = f"zq xv {passage} vq zx"
    m = copies.measure(pasted)
    assert m.longest >= len(tokenizer.encode(" " + passage)) - 1 and passage.strip() in m.longest_text
    assert "⟦" in copies.mark(pasted) and passage.split()[2] in copies.mark(pasted).split("⟦", 1)[1]


def test_training_samples_carry_copy_measures_and_a_memorization_curve(compose_train, tmp_path):
    import json

    from helpers.train_outputs import curve
    from penwright.train.stage import train

    metrics = train(compose_train("trainer.max_steps=8", "sample.copy_min_span=4"))
    reports = tmp_path / "run" / "reports"
    rows = curve(reports, "copies")
    assert [int(r["step"]) for r in rows] == [4, 8]  # each time the samples are drawn
    assert metrics["samples_copied_share"] == float(rows[-1]["copied_share"])
    assert metrics["samples_longest_copied"] == int(rows[-1]["longest_copied"]) > 0
    assert "copied: longest span" in (reports / "samples" / "step-000008.md").read_text()
    assert json.loads((reports / "train.json").read_text())["samples_longest_copied"] > 0


def test_max_copied_span_redraws_then_drops_samples_that_copy_more(tmp_path, prepared_tiny, onnx_tiny):
    import json

    from helpers.paths import REPO
    from penwright.core.config import compose
    from penwright.generate.stage import generate

    cfg = compose(
        [
            f"generate.model_dir={onnx_tiny}",
            f"data.out_dir={prepared_tiny}",
            "generate.destination=null",
            f"generate.report={tmp_path / 'generate.json'}",
            "generate.prompts=[The]",
            "generate.nsamples=6",
            "generate.max_new_tokens=12",
            "generate.max_copied_span=0",
            "generate.copy_retries=2",
        ],
        config_dir=REPO / "conf",
    )
    kept = generate(cfg)
    report = json.loads((tmp_path / "generate.json").read_text())
    refused = report["refused_copies"]
    assert len(kept) + refused["dropped"] == 6 and refused["redrawn"] >= 2 * refused["dropped"]
    assert all(s.copies.longest == 0 for s in kept)
    assert refused["redrawn"] > 0  # the tiny corpus shares short spans with most samples


def test_the_server_answers_copy_measures_when_asked_and_the_page_marks_them(prepared_tiny, onnx_tiny, browser):
    """``"copies": true`` on /v1/completions (plain and streamed) and /v1/chat/completions: each choice carries the
    measures of its text and its copied spans; a server without an index for the model answers 400 naming
    ``copies``; the page, asked to, marks the spans the API reports."""
    import httpx
    from conftest import RunningServer
    from selenium.webdriver.common.by import By
    from test_serve_page import generate, open_page, set_field, text_of

    from helpers.paths import REPO
    from penwright.core.config import compose
    from penwright.core.copy_index import Copies

    cfg = compose(
        [f"serve.model_dir={onnx_tiny}", f"serve.copy_index={prepared_tiny}", "serve.copy_min_span=1"],
        config_dir=REPO / "conf",
    )
    server = RunningServer(cfg)
    try:
        body = {"prompt": "The", "max_tokens": 12, "temperature": 0, "copies": True}
        choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        copies = Copies(prepared_tiny, server.engine.tokenizer, 1)
        expected = copies.measure(choice["text"])
        assert {k: choice["copies"][k] for k in ("tokens", "longest", "copied_share")} == {
            "tokens": expected.tokens,
            "longest": expected.longest,
            "copied_share": expected.copied_share,
        }
        assert (
            choice["copies"]["spans"] == [list(s) for s in copies.spans(choice["text"])] and choice["copies"]["spans"]
        )
        streamed = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60).text
        last = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")][-1]
        assert last["choices"][0]["copies"] == choice["copies"]
        plain = httpx.post(f"{server.url}/v1/completions", json={**body, "copies": False}, timeout=60).json()
        assert "copies" not in plain["choices"][0]
        open_page(browser, server)
        set_field(browser, "prompt", "The")
        set_field(browser, "length", "12")
        set_field(browser, "temperature", "0")
        browser.find_element(By.ID, "copies").click()
        status, generated = generate(browser)
        assert status.startswith("done") and generated == choice["text"]
        marks = [text_of(m) for m in browser.find_elements(By.CSS_SELECTOR, "#generated mark")]
        chars = list(choice["text"])
        assert marks == ["".join(chars[a:b]) for a, b in choice["copies"]["spans"]]
        assert "longest copied span" in text_of(browser.find_element(By.ID, "copied"))
    finally:
        server.stop()
    other = RunningServer(compose([f"serve.model_dir={onnx_tiny}", "serve.copy_index=null"], config_dir=REPO / "conf"))
    try:
        refused = httpx.post(f"{other.url}/v1/completions", json=body, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "copies"
    finally:
        other.stop()


def test_the_server_redraws_choices_that_copy_more_than_max_copied_span(prepared_tiny, onnx_tiny):
    """``max_copied_span``: a choice over it is the one a plain request with the redraw's seed gives (the same
    engine, so the reference is the server itself), and one still over it after ``copy_retries`` is answered empty
    with finish_reason content_filter; streamed, or without an index, it is a 400 naming the field."""
    import httpx
    from conftest import RunningServer

    from helpers.paths import REPO
    from penwright.core.config import compose
    from penwright.core.copy_index import Copies

    cfg = compose(
        [f"serve.model_dir={onnx_tiny}", f"serve.copy_index={prepared_tiny}", "serve.copy_min_span=1"],
        config_dir=REPO / "conf",
    )
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"  # (the chat route runs the same redraws)
    server = RunningServer(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"chat_template": template})}))
    try:
        url = f"{server.url}/v1/completions"
        copies = Copies(prepared_tiny, server.engine.tokenizer, 1)
        # the random tiny model, pushed towards a few words of the corpus: its choices copy a varying few of them
        words = server.engine.encode(" the word was written")
        bias = {str(t): 9 for t in words}
        body = {"prompt": "The", "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 8, "logit_bias": bias}
        plain = httpx.post(url, json=body, timeout=60).json()["choices"]
        longest = [copies.measure(c["text"]).longest for c in plain]
        limit = min(longest)
        assert 0 < sum(n > limit for n in longest) < len(longest)  # some first draws are over it, some not
        asked = {**body, "max_copied_span": limit, "copy_retries": 2}
        answer = httpx.post(url, json=asked, timeout=60).json()["choices"]
        assert answer == httpx.post(url, json=asked, timeout=60).json()["choices"]  # the same seeds, the same answer
        assert [c["copies"]["redrawn"] > 0 for c in answer] == [n > limit for n in longest]
        for k, choice in enumerate(answer):
            redrawn = choice["copies"]["redrawn"]
            if choice["finish_reason"] == "content_filter":
                assert choice["text"] == "" and redrawn == 2
                continue
            assert choice["copies"]["longest"] == copies.measure(choice["text"]).longest <= limit
            seed = 5 + k + 1_000_003 * redrawn  # the draw it kept: the plain answer for that choice's seed
            alone = {**body, "n": 1, "seed": seed}
            assert httpx.post(url, json=alone, timeout=60).json()["choices"][0]["text"] == choice["text"]
        never = httpx.post(url, json={**asked, "max_copied_span": 0, "copy_retries": 1}, timeout=60).json()
        assert any(c["finish_reason"] == "content_filter" for c in never["choices"])
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "The"}], "max_copied_span": 0, "seed": 1, "n": 2},
            timeout=60,
        ).json()["choices"]
        for choice in chat:
            if choice["finish_reason"] == "content_filter":
                assert choice["message"]["content"] == "" and choice["copies"]["redrawn"] == 3  # the default retries
            else:
                assert copies.measure(choice["message"]["content"]).longest == 0
        assert any(c["finish_reason"] == "content_filter" for c in chat)
        streamed = httpx.post(url, json={**asked, "stream": True}, timeout=60)
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "max_copied_span"
    finally:
        server.stop()
    other = RunningServer(compose([f"serve.model_dir={onnx_tiny}", "serve.copy_index=null"], config_dir=REPO / "conf"))
    try:
        refused = httpx.post(f"{other.url}/v1/completions", json={"prompt": "The", "max_copied_span": 3}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_copied_span"
    finally:
        other.stop()


def test_score_gives_each_sample_its_copy_measures(tmp_path, prepared_tiny, onnx_tiny):
    from helpers.paths import ENGLISH
    from penwright.generate.score import score_file

    samples = tmp_path / "samples.md"
    copied = ENGLISH.strip().split("\n")[1]
    samples.write_text(f"# samples\n\n```text\n⟦{copied}⟧\n```\n\n```text\nzqx vvk\n```\n")
    score_file(samples, onnx_tiny, prepared=prepared_tiny, min_span=4)
    rows = [json.loads(line) for line in (tmp_path / "samples.md.scores.jsonl").read_text().splitlines()]
    by_text = {r["text"]: r["copies"] for r in rows}
    assert set(by_text) == {copied, "zqx vvk"}  # generate's marks are not part of a sample
    assert by_text[copied]["copied_share"] == 1.0 and by_text[copied]["longest"] == by_text[copied]["tokens"]
    assert by_text["zqx vvk"]["copied_share"] == 0.0


def test_without_copy_measures_the_memorization_curve_is_still_written_empty(compose_train, tmp_path):
    """copies.tsv is a DVC output of train: a run that measures nothing writes its header, not nothing."""
    from penwright.train.stage import train

    metrics = train(compose_train("trainer.max_steps=4", "sample.copy_min_span=0"))
    assert (
        tmp_path / "run" / "reports" / "curves" / "copies.tsv"
    ).read_text() == "step\tcopied_share\tlongest_copied\n"
    assert "samples_copied_share" not in metrics


def test_the_index_is_the_same_bytes_every_time(tmp_path):
    """A prepared folder is a DVC output: the same tokens give the same index files (no timings in them)."""
    tokens = np.random.default_rng(3).integers(1, 300, size=5000)
    index_of(tmp_path / "a", tokens)
    index_of(tmp_path / "b", tokens)
    for name in ("index.json", "tokens.u8", "sa.i32", "documents.i64"):
        assert (tmp_path / "a" / "index" / name).read_bytes() == (tmp_path / "b" / "index" / name).read_bytes(), name
