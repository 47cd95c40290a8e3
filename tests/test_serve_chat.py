"""``POST /v1/chat/completions`` on a real server with the tiny exported model, driven by the official ``openai``
client: the messages rendered by the chat template give the ids transformers' ``apply_chat_template`` gives,
the reply equals the completion of that prompt, streaming in ``chat.completion.chunk`` deltas, logprobs, and a
400 naming the field for a model without a template or bad messages."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import RunningServer
from transformers import AutoTokenizer

from helpers.paths import REPO

TEMPLATE = (
    "{% for m in messages %}{{ m['name'] if m.get('name') else m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "The quick brown fox", "name": "Ann"},
]


@pytest.fixture(scope="module")
def chat_server(onnx_tiny):
    from penwright.core.config import compose

    cfg = compose([f"serve.model_dir={onnx_tiny}"], config_dir=REPO / "conf")
    server = RunningServer(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"chat_template": TEMPLATE})}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key="unused", max_retries=0)


def test_the_reply_is_the_completion_of_the_prompt_the_template_makes(chat_server, client, onnx_tiny):
    tokenizer = AutoTokenizer.from_pretrained(onnx_tiny)
    prompt = tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # (a BatchEncoding in transformers 5)
    reply = client.chat.completions.create(model="penwright", messages=MESSAGES, max_tokens=8, temperature=0)
    completion = client.completions.create(model="penwright", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == completion.choices[0].text
    assert reply.choices[0].finish_reason == completion.choices[0].finish_reason
    assert reply.usage.prompt_tokens == len(ids) == completion.usage.prompt_tokens  # the same ids as transformers'


def test_streamed_deltas_add_up_to_the_reply(client):
    kw = dict(model="penwright", messages=MESSAGES, max_completion_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"  # the role first
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage: the last chunk


def test_n_choices_and_logprobs(client):
    out = client.chat.completions.create(
        model="penwright", messages=MESSAGES, max_tokens=5, n=2, seed=1, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert sum(len(c.logprobs.content) for c in out.choices) == out.usage.completion_tokens  # one entry a token
    for choice in out.choices:
        content = choice.logprobs.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        if choice.finish_reason == "length":  # (an EOS is scored but not shown)
            assert "".join(t.token for t in content) == choice.message.content


def test_a_model_without_a_template_says_how_to_give_one(serve_tiny):
    server = serve_tiny()  # the tiny tokenizer has no chat template, and serve.chat_template is null
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages" and "serve.chat_template" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": MESSAGES, "max_tokens": 10_000}, "max_tokens"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field_and_the_server_keeps_serving(chat_server, body, param):
    r = httpx.post(f"{chat_server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(f"{chat_server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
