"""penwright serve: a real uvicorn server on 127.0.0.1 (a free port), the tiny exported model, real clients.

The official ``openai`` package talks to it unchanged (streaming included); gpt-2-cloud-run's API
answers GET and POST; bad and hostile requests get a 4xx naming the field and the server keeps
serving; a seeded request gives the same text alone and beside 15 others; a client that goes away
frees its slot; SIGTERM lets in-flight requests finish and exits 0.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_serve_scoring import BAD as SCORING_BAD

from helpers.net import free_port
from helpers.paths import REPO
from penwright.inference.sampling import GREEDY

PROMPT = "The quick brown fox"


def post(server, body, **kw):
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=30, **kw)


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


# -- the OpenAI API, through the official client ------------------------------------------------------


def test_openai_client_greedy_equals_the_engine_on_the_graph_as_exported(client, server, onnx_tiny):
    from penwright.inference.engine import Engine

    out = client.completions.create(model="penwright", prompt=PROMPT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == "penwright" and out.id.startswith("cmpl-")
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    expected = Engine.load(onnx_tiny, slots=1, padded=True).generate([PROMPT], 12, sampling=GREEDY)[0]
    assert choice.text == expected
    prompt_tokens = len(server.engine.encode(PROMPT))
    assert out.usage.prompt_tokens == prompt_tokens
    assert 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_openai_client_streaming_gives_the_same_text_as_one_answer(client):
    args = dict(model="penwright", prompt=PROMPT, max_tokens=30, temperature=0.9, top_p=0.95, seed=11)
    whole = client.completions.create(**args).choices[0]
    pieces, reasons = [], []
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            pieces.append(c.text)
            reasons.append(c.finish_reason)
    assert "".join(pieces) == whole.text
    assert reasons[-1] == whole.finish_reason and all(r is None for r in reasons[:-1])


def test_prompts_n_echo_stop_and_seed(client):
    out = client.completions.create(model="penwright", prompt=["The", "A quick"], n=3, max_tokens=8, seed=5, echo=True)
    assert [c.index for c in out.choices] == list(range(6))
    assert all(c.text.startswith("The") for c in out.choices[:3])
    assert all(c.text.startswith("A quick") for c in out.choices[3:])
    again = client.completions.create(
        model="penwright", prompt=["The", "A quick"], n=3, max_tokens=8, seed=5, echo=True
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]

    free = client.completions.create(model="penwright", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    assert len(free) > 3
    stop = free[1:3]
    cut = client.completions.create(
        model="penwright", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "never appears"]
    ).choices[0]
    assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"
    capped = client.completions.create(
        model="penwright", prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"min_tokens": 3}
    )
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 3


def test_extensions_top_k_repetition_penalty_min_tokens(server):
    body = {"prompt": PROMPT, "max_tokens": 10, "min_tokens": 10, "top_k": 5, "repetition_penalty": 1.3, "seed": 2}
    a, b = post(server, body), post(server, body)
    assert a.status_code == 200 and a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    assert a.json()["usage"]["completion_tokens"] == 10


def test_models_and_health(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["penwright"]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["context"] == 64


# -- gpt-2-cloud-run's API ----------------------------------------------------------------------------


def test_gpt2_cloud_run_api_get_and_post(server):
    get = httpx.get(f"{server.url}/", params={"prefix": "The", "length": 10, "temperature": 0})
    assert get.status_code == 200 and get.json()["text"].startswith("The")
    post_ = httpx.post(f"{server.url}/", json={"prefix": "The", "length": 10, "temperature": 0})
    assert post_.json() == get.json()
    alias = httpx.post(
        f"{server.url}/generate", json={"prefix": "The", "length": 10, "temperature": 0, "include_prefix": False}
    )
    assert get.json()["text"] == "The" + alias.json()["text"]
    text = alias.json()["text"]
    if len(text) > 2:
        cut = httpx.get(
            f"{server.url}/generate",
            params={"prefix": "The", "length": 10, "temperature": 0, "truncate": text[1:3], "include_prefix": "false"},
        )
        assert cut.json()["text"] == text[: text.index(text[1:3])]
    bad = httpx.get(f"{server.url}/", params={"prefix": "The", "length": "lots"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "length"


# -- continuous batching through HTTP ------------------------------------------------------------------


def test_a_seeded_request_gives_the_same_text_alone_or_beside_15_others(server):
    body = {"prompt": PROMPT, "max_tokens": 30, "min_tokens": 30, "temperature": 1.0, "top_k": 50, "seed": 77}
    alone = post(server, body).json()["choices"][0]["text"]
    others = [
        {"prompt": p, "max_tokens": 10 + i, "temperature": 0.8, "seed": i}
        for i, p in enumerate(["The", "In the beginning", "", "Numbers like"] * 4)
    ][:15]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, server, b) for b in others[:8]]
        target = pool.submit(post, server, body)
        futures += [pool.submit(post, server, b) for b in others[8:]]
        assert all(f.result().status_code == 200 for f in futures)
        assert target.result().json()["choices"][0]["text"] == alone


def test_a_client_that_goes_away_frees_its_slot(server):
    engine = server.engine
    submitted = []
    real_submit, real_session = engine.submit, engine.session

    class Slow:  # 20 ms a step: the 60 tokens would take > 1 s, so only a cancel ends the request early
        def __getattr__(self, name):
            return getattr(real_session, name)

        def run_with_iobinding(self, binding):
            time.sleep(0.02)
            return real_session.run_with_iobinding(binding)

    engine.submit = lambda request: submitted.append(request) or real_submit(request)
    engine.session = Slow()
    try:
        body = {"prompt": "The", "max_tokens": 60, "min_tokens": 60, "stream": True}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                next(response.iter_lines())  # the first event: it is running
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
        assert submitted[0].finish_reason == "cancelled" and len(submitted[0].tokens) < 60
    finally:
        engine.submit, engine.session = real_submit, real_session


# -- bad requests and faults -----------------------------------------------------------------------------

BAD = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 64}, "max_tokens"),
    ({"prompt": "word " * 80, "max_tokens": 4}, "prompt"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": ["x"] * 40, "n": 2}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "logprobs": 30}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ({"prompt": "x", "seed": -1}, "seed"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f for _, f in BAD])
def test_bad_requests_get_a_400_naming_the_field(server, body, field):
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert field in error["message"] or field == "prompt"


def test_malformed_and_oversized_bodies_then_a_normal_request(server):
    raw = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "body"
    array = httpx.post(f"{server.url}/v1/completions", json=[1, 2])
    assert array.status_code == 400
    big = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * 70_000})
    assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]["message"]
    ok = post(server, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_full_queue_answers_429_with_retry_after(serve_tiny):
    server = serve_tiny("serve.max_sequences=1", "serve.queue_size=1")
    body = {"prompt": "The", "max_tokens": 60, "min_tokens": 60}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = [f.result() for f in [pool.submit(post, server, body) for _ in range(12)]]
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 429 in codes, codes
    busy = next(a for a in answers if a.status_code == 429)
    assert busy.headers["retry-after"] == "1" and "queue_size" in busy.json()["error"]["message"]


def test_a_request_past_its_timeout_ends_with_a_clear_error(serve_tiny):
    server = serve_tiny("serve.request_timeout=0.000001")
    r = post(server, {"prompt": "The", "max_tokens": 60, "min_tokens": 60})
    assert r.status_code == 504 and "request_timeout" in r.json()["error"]["message"]
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", timeout=30, json={"prompt": "The", "max_tokens": 60, "stream": True}
    ) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert "request_timeout" in json.loads(events[0][6:])["error"]["message"] and events[-1] == "data: [DONE]"


def test_an_api_key_is_required_when_set(serve_tiny):
    server = serve_tiny("serve.api_key=sekrit")
    assert post(server, {"prompt": "x", "max_tokens": 2}).status_code == 401
    assert post(server, {"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(server, {"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="penwright", prompt="x", max_tokens=2
        )
    ok = OpenAI(base_url=f"{server.url}/v1", api_key="sekrit", max_retries=0).completions.create(
        model="penwright", prompt="x", max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_bad_serve_config_fails_before_the_port_opens(onnx_tiny, tmp_path):
    from penwright.core.config import compose
    from penwright.core.errors import ConfigError, PenwrightError
    from penwright.serve import serve

    with pytest.raises(ConfigError, match="serve.port=70000"):
        serve(compose([f"serve.model_dir={onnx_tiny}", "serve.port=70000"], config_dir=REPO / "conf"))
    with pytest.raises(ConfigError, match="serve.max_sequences=0"):
        serve(compose([f"serve.model_dir={onnx_tiny}", "serve.max_sequences=0"], config_dir=REPO / "conf"))
    with pytest.raises(PenwrightError, match="not found"):
        serve(compose([f"serve.model_dir={tmp_path}"], config_dir=REPO / "conf"))


# -- the process: hostile traffic, then SIGTERM --------------------------------------------------------------


@pytest.mark.slow
def test_hostile_traffic_then_sigterm_finishes_in_flight_requests_and_exits_0(onnx_tiny, tmp_path):
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PENWRIGHT_API_KEY": ""}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "penwright.cli", "serve", f"serve.model_dir={onnx_tiny}", f"serve.port={port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=env,
    )
    try:
        from benchmarks.common import wait_until_healthy

        wait_until_healthy(url, 60, proc)
        normal = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
        expected = httpx.post(f"{url}/v1/completions", json=normal).json()["choices"][0]["text"]

        def battery():
            for body, _ in BAD:
                assert httpx.post(f"{url}/v1/completions", json=body).status_code == 400
            for body, _, route in SCORING_BAD:  # the scoring fields and the tokenizer routes
                assert httpx.post(f"{url}{route}", json=body).status_code == 400
            httpx.post(f"{url}/tokenize", content=b"\xff garbage", headers={"content-type": "application/json"})
            httpx.post(
                f"{url}/v1/completions", content=b"\xff\xfe garbage", headers={"content-type": "application/json"}
            )
            httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 70_000})
            httpx.get(f"{url}/", params={"length": "-5"})
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={"prompt": "The", "max_tokens": 50, "stream": True}
            ) as s:
                next(s.iter_lines())  # and hang up mid-stream

        battery()
        rss = [psutil.Process(proc.pid).memory_info().rss]
        for _ in range(3):
            battery()
            rss.append(psutil.Process(proc.pid).memory_info().rss)
        assert rss[-1] - rss[0] < 30 * 2**20, f"RSS grew from {rss[0] >> 20} to {rss[-1] >> 20} MiB"
        assert httpx.post(f"{url}/v1/completions", json=normal).json()["choices"][0]["text"] == expected

        # SIGTERM while a streamed request is in flight: it completes, then the server exits 0
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            timeout=30,
            json={
                "prompt": "The",
                "max_tokens": 50,
                "min_tokens": 50,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as s:
            lines = s.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [first, *lines]
        events = [line[6:] for line in rest if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 50
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_a_failing_engine_step_fails_its_requests_and_the_server_goes_on(serve_tiny):
    server = serve_tiny("serve.model_name=faulty")  # a server of its own: its engine is tampered with
    engine = server.engine

    class FailOnce:
        """The real session, except that the next decoding run raises (as a broken kernel would)."""

        def __init__(self, session):
            self.session, self.armed = session, True

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run_with_iobinding(self, binding):
            if self.armed:
                self.armed = False
                raise RuntimeError("injected failure")
            return self.session.run_with_iobinding(binding)

    real = engine.session
    engine.session = FailOnce(real)
    try:
        failed = post(server, {"model": "faulty", "prompt": "The", "max_tokens": 5})
        assert failed.status_code == 500 and "engine failed" in failed.json()["error"]["message"]
        ok = post(server, {"model": "faulty", "prompt": "The", "max_tokens": 5})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        engine.session = real


def test_a_prefix_that_fills_the_context_is_a_400_not_a_crash(server):
    r = httpx.get(f"{server.url}/", params={"prefix": "word " * 80})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prefix"
    assert "context" in r.json()["error"]["message"]


def test_chunked_oversized_bodies_unknown_routes_and_a_tiny_temperature(server):
    def chunks():
        for _ in range(20):
            yield b"x" * 5000

    big = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"
    missing = httpx.get(f"{server.url}/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(f"{server.url}/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert httpx.get(f"{server.url}/", params={"prefix": "The", "seed": -3}).json()["error"]["param"] == "seed"
    greedy = post(server, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
    tiny = post(server, {"prompt": PROMPT, "max_tokens": 8, "temperature": 1e-39}).json()["choices"][0]["text"]
    assert tiny == greedy
