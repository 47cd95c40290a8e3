"""Ranking texts by the model's own likelihood (penwright score, generate.rank) against transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.paths import ENGLISH, REPO
from penwright.core.errors import PenwrightError
from penwright.generate.score import read_samples, score_file, score_texts
from penwright.inference.engine import Engine


@pytest.fixture(scope="module")
def engine(onnx_tiny) -> Engine:
    return Engine.load(onnx_tiny, slots=4)


def reference(tiny_gpt2, engine, text: str) -> tuple[float, float]:
    """Mean logprob and bits per byte with transformers, windowed as the docs say (one token of context)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    ids = [engine.eos] + engine.tokenizer.encode(text, add_special_tokens=False)
    total, n, step = 0.0, 0, engine.context - 1
    for start in range(1, len(ids), step):
        window = ids[start - 1 : start + step]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), -1)
        total += float(logprobs[torch.arange(len(window) - 1), window[1:]].sum())
        n += len(window) - 1
    return total / n, -total / math.log(2) / len(text.encode())


def test_scores_equal_transformers_short_and_beyond_the_context(engine, tiny_gpt2):
    texts = ["In the beginning was the word", ENGLISH * 3, "é"]  # the second spans several windows of 64
    assert len(engine.tokenizer.encode(texts[1])) > 2 * engine.context
    for got, text in zip(score_texts(engine, texts), texts):
        mean, bpb = reference(tiny_gpt2, engine, text)
        assert got.text == text and got.tokens == len(engine.tokenizer.encode(text))
        assert got.mean_logprob == pytest.approx(mean, abs=1e-4)
        assert got.bits_per_byte == pytest.approx(bpb, abs=1e-4)


def test_penwright_score_ranks_a_samples_file_best_first(engine, onnx_tiny, tmp_path):
    texts = ["the word was written down", "zq xj kv wp", "In the beginning was the word"]
    plain = tmp_path / "samples.txt"
    plain.write_text("\n====================\n".join(texts))
    proc = subprocess.run(
        [sys.executable, "-m", "penwright.cli", "score", str(plain), "--model-dir", str(onnx_tiny)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "samples.txt.scores.jsonl").read_text().splitlines()]
    means = [r["mean_logprob"] for r in rows]
    assert means == sorted(means, reverse=True)
    assert sorted(r["text"] for r in rows) == sorted(texts)
    expected = {s.text: s.mean_logprob for s in score_texts(engine, texts)}
    assert {r["text"]: r["mean_logprob"] for r in rows} == pytest.approx(expected, abs=1e-6)


def test_generate_rank_writes_samples_best_first_with_their_scores(repo, onnx_tiny, tmp_path, engine):
    from penwright.core.config import compose
    from penwright.generate.stage import generate

    dest = tmp_path / "samples.md"
    overrides = [
        f"generate.model_dir={onnx_tiny}",
        "generate.prompts=[It is,The]",
        "generate.nsamples=3",
        "generate.max_new_tokens=12",
        "generate.stream=false",
        f"generate.destination={dest}",
        "generate.report=null",
    ]
    plain = generate(compose(overrides, config_dir=repo / "conf"))
    ranked = generate(compose([*overrides, "generate.rank=true"], config_dir=repo / "conf"))
    assert sorted(s.text for s in ranked) == sorted(s.text for s in plain)  # the same samples, reordered
    means = [s.score.mean_logprob for s in ranked]
    assert means == sorted(means, reverse=True) and len(set(means)) > 1
    md = dest.read_text()
    assert "ranked by the model's mean logprob per token" in md
    assert f"## 1. prompt: {ranked[0].prompt!r} · {means[0]:.3f} nats/token" in md
    assert read_samples(dest) == [s.text for s in ranked]  # penwright score reads the file back whole
    np.testing.assert_allclose(means, [s.mean_logprob for s in score_texts(engine, [s.text for s in ranked])])


def test_bad_input_names_the_file_or_key(repo, onnx_tiny, tmp_path):
    from penwright.core.config import compose
    from penwright.core.errors import ConfigError
    from penwright.generate.stage import generate

    with pytest.raises(PenwrightError, match="missing.txt: not found"):
        score_file(tmp_path / "missing.txt", onnx_tiny)
    empty = tmp_path / "empty.md"
    empty.write_text("# nothing here\n")
    with pytest.raises(PenwrightError, match="empty.md: no samples found"):
        score_file(empty, onnx_tiny)
    dest = tmp_path / "kept.md"
    dest.write_text("keep me")
    cfg = compose(
        [
            f"generate.model_dir={onnx_tiny}",
            "generate.rank=true",
            "generate.max_new_tokens=80",
            f"generate.destination={dest}",
            "generate.report=null",
        ],
        config_dir=repo / "conf",
    )
    with pytest.raises(ConfigError, match="generate.max_new_tokens=80: .*exceeds the model's context of 64"):
        generate(cfg)
    assert dest.read_text() == "keep me"


def test_an_empty_sample_is_ranked_last_with_null_scores(engine, onnx_tiny, tmp_path):
    md = tmp_path / "samples.md"
    md.write_text("# h\n\n## 1.\n\n```text\n\n```\n\n## 2.\n\n```text\nthe word\n```\n")
    assert read_samples(md) == ["", "the word"]
    rows = score_file(md, onnx_tiny)
    assert [r.text for r in rows] == ["the word", ""] and rows[1].mean_logprob == float("-inf")
    last = json.loads((tmp_path / "samples.md.scores.jsonl").read_text().splitlines()[-1])
    assert last == {"text": "", "tokens": 0, "mean_logprob": None, "bits_per_byte": None}
