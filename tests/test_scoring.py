"""Scoring on the engine against transformers: prompt and generated-token logprobs, top tokens, logit bias."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.reweighted import log_softmax_of
from penwright.core.errors import InvalidValue
from penwright.inference.engine import Engine, Request
from penwright.inference.sampling import SamplingConfig

TEXTS = ["The quick brown fox jumps over the lazy dog", "In the beginning", "A"]


@pytest.fixture(scope="module")
def engine(onnx_tiny) -> Engine:
    return Engine.load(onnx_tiny, slots=8)


@pytest.fixture(scope="module")
def reference(tiny_gpt2):
    return log_softmax_of(tiny_gpt2)


def run(engine: Engine, requests: list[Request]) -> list[Request]:
    for r in requests:
        engine.submit(r)
    while engine.step() or not engine.waiting.empty():
        pass
    return requests


def scored(engine, text, max_tokens=0, logprobs=3, **kw) -> Request:
    return Request(
        engine.encode(text),
        max_tokens,
        SamplingConfig(do_sample=False),
        logprobs=logprobs,
        score_prompt=True,
        stop_at_eos=False,
        **kw,
    )


def test_prompt_logprobs_equal_transformers_log_softmax_alone_and_beside_generating_rows(engine, reference):
    def plain():
        return Request(engine.encode("It is the"), 12, SamplingConfig(temperature=0.9), seed=5, stop_at_eos=False)

    alone_plain = run(engine, [plain()])[0].tokens
    alone = [run(engine, [scored(engine, t)])[0] for t in TEXTS]
    together = run(engine, [plain(), *[scored(engine, t) for t in TEXTS], plain(), plain()])
    for request in [*alone, *together[1:4]]:
        ids = request.prompt_ids
        ref = reference(ids)
        assert [s.token for s in request.prompt_scores] == ids
        assert request.prompt_scores[0].logprob is None and request.tokens == []
        assert request.finish_reason == "length"
        got = np.array([s.logprob for s in request.prompt_scores[1:]])
        want = ref[np.arange(len(ids) - 1), ids[1:]]
        np.testing.assert_allclose(got, want, atol=1e-4)
        for i, score in enumerate(request.prompt_scores[1:]):  # the 3 most likely, most likely first
            best = np.argsort(-ref[i])[:3]
            assert [t for t, _ in score.top] == best.tolist()
            np.testing.assert_allclose([lp for _, lp in score.top], ref[i, best], atol=1e-4)
    assert [r.tokens for r in together[:1] + together[4:]] == [alone_plain] * 3  # the same seeded text beside them


def test_generated_token_logprobs_are_the_models_raw_ones_whatever_the_temperature(engine, reference):
    sampled = Request(
        engine.encode("The quick"),
        10,
        SamplingConfig(temperature=0.7, top_k=5),
        seed=3,
        logprobs=2,
        stop_at_eos=False,
    )
    run(engine, [sampled])
    ids = sampled.prompt_ids + sampled.tokens
    ref = reference(ids)
    start = len(sampled.prompt_ids) - 1
    assert [s.token for s in sampled.scores] == sampled.tokens
    want = ref[np.arange(start, len(ids) - 1), sampled.tokens]  # log_softmax of raw logits, not of logits / 0.7
    np.testing.assert_allclose([s.logprob for s in sampled.scores], want, atol=1e-4)
    assert all(len(s.top) == 2 and s.top[0][1] >= s.top[1][1] for s in sampled.scores)


def test_echo_with_generation_scores_prompt_and_new_tokens_and_keeps_the_greedy_tokens(engine, reference):
    plain = run(engine, [Request(engine.encode(TEXTS[0]), 6, SamplingConfig(do_sample=False), stop_at_eos=False)])[0]
    both = run(engine, [scored(engine, TEXTS[0], max_tokens=6, logprobs=1)])[0]
    assert both.tokens == plain.tokens
    assert len(both.prompt_scores) == len(both.prompt_ids) and len(both.scores) == 6
    for s in both.scores:  # greedy: the chosen token is the most likely one
        assert s.top[0] == (s.token, pytest.approx(s.logprob))


def test_logit_bias_forces_and_bans_tokens(engine):
    prompt = engine.encode("The quick")
    greedy = SamplingConfig(do_sample=False)
    free = run(engine, [Request(prompt, 4, greedy, stop_at_eos=False)])[0].tokens
    forced = run(engine, [Request(prompt, 4, greedy, stop_at_eos=False, logit_bias={7: 100.0})])[0].tokens
    banned = run(engine, [Request(prompt, 1, greedy, stop_at_eos=False, logit_bias={free[0]: -100.0})])[0].tokens
    assert forced == [7] * 4
    assert banned[0] != free[0]


def test_bad_scoring_input_is_refused_naming_the_value(engine):
    with pytest.raises(InvalidValue, match=r"prompt\[1\]=99999: token ids go from 0"):
        engine.check([1, 99999], 1)
    with pytest.raises(InvalidValue, match="max_tokens=0: must be >= 1"):
        engine.check([1, 2], 0)
    engine.check([1, 2], 0, score_prompt=True)
    with pytest.raises(InvalidValue, match="exceeds the context"):
        engine.check([1] * (engine.context + 1), 0, score_prompt=True)
