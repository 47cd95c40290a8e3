"""penwright serve for scoring clients: token-id prompts, logprobs, echo, max_tokens 0, logit_bias, best_of,
and the tokenizer routes, on a real server with the tiny exported model; logprobs against transformers."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from helpers.reweighted import log_softmax_of

PROMPT = "The quick brown fox jumps"


def post(server, body, route="/v1/completions"):
    return httpx.post(f"{server.url}{route}", json=body, timeout=30)


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny()


@pytest.fixture(scope="module")
def reference(tiny_gpt2):
    return log_softmax_of(tiny_gpt2)


def test_token_id_prompts_give_what_their_text_gives(server):
    ids = server.engine.encode(PROMPT)
    greedy = {"max_tokens": 8, "temperature": 0}
    by_text = post(server, {"prompt": PROMPT, **greedy}).json()["choices"][0]["text"]
    assert post(server, {"prompt": ids, **greedy}).json()["choices"][0]["text"] == by_text
    both = post(server, {"prompt": [ids, server.engine.encode("In")], **greedy}).json()
    assert both["choices"][0]["text"] == by_text and len(both["choices"]) == 2
    assert both["usage"]["prompt_tokens"] == len(ids) + len(server.engine.encode("In"))


def test_echo_logprobs_as_lm_eval_asks_equal_transformers(server, reference):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1."""
    ids = server.engine.encode(PROMPT)
    out = post(server, {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    ref = reference(ids)
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1 : len(ids)], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    greedy_next = int(ref[-1].argmax())
    np.testing.assert_allclose(lp["token_logprobs"][-1], ref[-1, greedy_next], atol=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1:]):  # the most likely token and the chosen one
        assert max(top.values()) == pytest.approx(ref[i].max(), abs=1e-4)
        assert lp["token_logprobs"][i + 1] in top.values()
    assert "".join(lp["tokens"][: len(ids)]) == PROMPT
    assert choice["text"].startswith(PROMPT)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert out["usage"]["completion_tokens"] == 1


def test_max_tokens_0_with_echo_scores_the_prompt_alone(server, reference):
    ids = server.engine.encode(PROMPT)
    out = post(server, {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 0}).json()
    choice = out["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and out["usage"]["completion_tokens"] == 0
    np.testing.assert_allclose(
        choice["logprobs"]["token_logprobs"][1:], reference(ids)[np.arange(len(ids) - 1), ids[1:]], atol=1e-4
    )
    assert all(len(t) == 1 for t in choice["logprobs"]["top_logprobs"][1:])  # logprobs 0: the chosen token only


def test_streamed_logprobs_are_the_answers_logprobs(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 4, "logprobs": 2, "echo": True}
    whole = post(server, body).json()["choices"][0]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in events:
        choice = event["choices"][0]
        text += choice["text"]
        for key in merged:
            merged[key] += choice["logprobs"][key]
    assert text == whole["text"]
    assert merged == whole["logprobs"]


def test_the_openai_client_scores_token_prompts(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    ids = server.engine.encode(PROMPT)
    out = client.completions.create(model="penwright", prompt=[ids], echo=True, logprobs=3, max_tokens=2, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 2 and lp.token_logprobs[0] is None
    assert all(len(top) >= 3 for top in lp.top_logprobs[1:])


def test_logit_bias_and_best_of(server):
    forced = post(server, {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logit_bias": {"7": 100}}).json()
    text7 = server.engine.decode([7])
    assert forced["choices"][0]["text"] == text7 * 3
    four = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11, "logprobs": 0}
    candidates = post(server, {**four, "n": 4}).json()["choices"]
    means = [np.mean(c["logprobs"]["token_logprobs"]) for c in candidates]
    best = post(server, {**four, "n": 1, "best_of": 4}).json()["choices"]
    assert len(best) == 1 and best[0]["text"] == candidates[int(np.argmax(means))]["text"]
    three = post(server, {**four, "n": 3, "best_of": 4}).json()["choices"]  # the best first, as vLLM orders them
    order = np.argsort(-np.array(means), kind="stable")[:3]
    assert [c["text"] for c in three] == [candidates[i]["text"] for i in order], means
    assert [c["index"] for c in three] == [0, 1, 2]


def test_tokenizer_routes_in_vllms_shapes(server):
    tok = post(server, {"prompt": PROMPT, "add_special_tokens": False}, "/tokenize").json()
    assert tok["tokens"] == server.engine.encode(PROMPT) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == server.engine.context
    assert post(server, {"tokens": tok["tokens"]}, "/detokenize").json() == {"prompt": PROMPT}
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>"
    assert post(server, {"prompt": info["eos_token"]}, "/tokenize").json()["tokens"] == [server.engine.eos]


BAD = [
    ({"prompt": "x", "logprobs": 21}, "logprobs", "/v1/completions"),
    ({"prompt": "x", "logprobs": -1}, "logprobs", "/v1/completions"),
    ({"prompt": [1, 99999]}, "prompt", "/v1/completions"),
    ({"prompt": [[1, 2], [3, -4]]}, "prompt", "/v1/completions"),
    ({"prompt": [[]]}, "prompt", "/v1/completions"),
    ({"prompt": [1, "a"]}, "prompt", "/v1/completions"),
    ({"prompt": "x", "max_tokens": 0, "logprobs": 1}, "max_tokens", "/v1/completions"),
    ({"prompt": "word " * 80, "max_tokens": 0, "echo": True, "logprobs": 1}, "prompt", "/v1/completions"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "/v1/completions"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "/v1/completions"),
    ({"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias", "/v1/completions"),
    ({"prompt": "x", "n": 2, "best_of": 1}, "best_of", "/v1/completions"),
    ({"prompt": "x", "best_of": 17}, "best_of", "/v1/completions"),
    ({"prompt": "x", "best_of": 3, "stream": True}, "best_of", "/v1/completions"),
    ({"prompt": ["x"] * 20, "best_of": 4}, "prompt", "/v1/completions"),
    ({"prompt": "x", "suffix": "y"}, "suffix", "/v1/completions"),
    ({"prompt": 5}, "prompt", "/tokenize"),
    ({}, "prompt", "/tokenize"),
    ({"prompt": "x", "model": "gpt-4"}, "model", "/tokenize"),
    ({"tokens": [1, 99999]}, "tokens", "/detokenize"),
    ({"tokens": "abc"}, "tokens", "/detokenize"),
]


@pytest.mark.parametrize("body,field,route", BAD, ids=[f"{r}-{f}" for _, f, r in BAD])
def test_bad_scoring_requests_get_a_400_naming_the_field(server, body, field, route):
    r = post(server, body, route)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_an_empty_prompt_echoes_the_token_it_starts_from(server):
    out = post(server, {"prompt": "", "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0}).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"][0] == "<|endoftext|>" and choice["text"].startswith("<|endoftext|>")
    pairs = list(zip(lp["tokens"], lp["text_offset"]))
    if choice["finish_reason"] == "stop":  # the <|endoftext|> that ended it is scored, not part of the text
        assert pairs[-1] == ("<|endoftext|>", len(choice["text"]))
        pairs = pairs[:-1]
    for token, offset in pairs:
        assert choice["text"][offset : offset + len(token)] == token
