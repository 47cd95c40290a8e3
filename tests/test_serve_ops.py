"""penwright serve's operations side: /metrics scraped under load, several models in one server."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from helpers.reweighted import export_reweighted
from penwright.inference.engine import Engine, Request
from penwright.inference.sampling import SamplingConfig


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_scraped_under_load_add_up(serve_tiny):
    server = serve_tiny("serve.stream_interval=0")
    url, model = server.url, (("model", "penwright"),)
    before = scrape(url)
    bodies = [{"prompt": "The quick", "max_tokens": 30, "min_tokens": 30, "seed": i, "stream": True} for i in range(8)]

    def stream(body):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
            return sum(1 for line in s.iter_lines() if line.startswith("data: {"))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, b) for b in bodies]
        while not all(f.done() for f in futures):
            now = scrape(url)  # (the tiny model may finish a request between two scrapes: running is not asserted)
            assert 0 <= now[("penwright_requests_running", model)] <= 16 and now[("penwright_slots", model)] == 16
        [f.result() for f in futures]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 99}).status_code == 400
    after = scrape(url)

    def delta(name, labels=model):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert after[("penwright_requests_running", model)] == 0 and after[("penwright_requests_waiting", model)] == 0
    prompt = len(server.engine.encode("The quick"))
    assert delta("penwright_prompt_tokens_total") == 8 * prompt
    assert delta("penwright_generation_tokens_total") == 8 * 30
    assert delta("penwright_requests_finished_total", (("model", "penwright"), ("reason", "length"))) == 8
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert delta(f"penwright_{histogram}_seconds_count") == 8
        assert delta(f"penwright_{histogram}_seconds_sum") > 0
    assert delta("penwright_e2e_request_latency_seconds_sum") > delta("penwright_time_to_first_token_seconds_sum")
    assert delta("penwright_http_responses_total", (("status", "200"),)) >= 8
    assert delta("penwright_http_responses_total", (("status", "400"),)) == 1


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_gpt2):
    """A second exported model: the tiny GPT-2's shape with other weights."""
    return export_reweighted(tiny_gpt2, tmp_path_factory.mktemp("other-model"), seed=7)[1]


def test_several_models_in_one_server(serve_tiny, onnx_tiny, other_model):
    server = serve_tiny(f"serve.models={{first:{onnx_tiny},second:{other_model}}}")
    url = server.url
    listed = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["first", "second"]
    body = {"prompt": "In the beginning", "max_tokens": 10, "temperature": 0}

    def alone(folder) -> str:
        engine = Engine.load(folder, slots=1)
        request = Request(engine.encode(body["prompt"]), 10, SamplingConfig(do_sample=False))
        engine.submit(request)
        while engine.step() or not engine.waiting.empty():
            pass
        return request.text

    expected = {"first": alone(onnx_tiny), "second": alone(other_model)}
    assert expected["first"] != expected["second"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # both at once, each on its own engine
        answers = list(
            pool.map(
                lambda m: httpx.post(f"{url}/v1/completions", json={**body, "model": m}, timeout=30).json(),
                ["first", "second", "first", "second"],
            )
        )
    for answer, name in zip(answers, ["first", "second", "first", "second"]):
        assert answer["model"] == name and answer["choices"][0]["text"] == expected[name]
    default = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert default["model"] == "first" and default["choices"][0]["text"] == expected["first"]
    unknown = httpx.post(f"{url}/v1/completions", json={**body, "model": "third"}, timeout=30)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "model"
    assert "'first', 'second'" in unknown.json()["error"]["message"]
    health = httpx.get(f"{url}/health").json()
    assert set(health["models"]) == {"first", "second"}
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "In", "model": "second"}).json()["tokens"]
    assert tokens == server.engine.encode("In")
    metrics = scrape(url)
    assert metrics[("penwright_slots", (("model", "second"),))] == 16


def test_serve_threads_auto_gives_a_small_model_one_thread_and_a_large_one_every_core(onnx_tiny, tmp_path):
    """A small model: one thread for steps of several rows, every core (a session of its own, its workers at idle
    priority) for a step of one; a large model: every core; a number: that many threads, one session."""
    import json

    from helpers.paths import REPO
    from penwright.core.config import compose
    from penwright.serve import ONE_THREAD_BELOW, build_app, parameters_of, threads_for

    cfg = compose([f"serve.model_dir={onnx_tiny}"], config_dir=REPO / "conf")
    assert cfg.serve.threads == "auto" and cfg.serve.spin
    assert parameters_of(onnx_tiny) < ONE_THREAD_BELOW
    engine = next(iter(build_app(cfg).state.load().values()))
    assert engine.session.get_session_options().intra_op_num_threads == 1
    assert engine.runner.lone_session.get_session_options().intra_op_num_threads == 0
    # GPT-2 124M's config: every core (onnxruntime's 0)
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(
        json.dumps({"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024})
    )
    assert 124e6 < parameters_of(big) < 125e6 and threads_for("auto", big) == (0, None)
    assert threads_for(3, onnx_tiny) == (3, None) and threads_for(0, onnx_tiny) == (0, None)  # taken as it is
    assert threads_for("auto", tmp_path / "missing") == (0, None)  # (loading the engine then says what is missing)
    cfg = compose([f"serve.model_dir={onnx_tiny}", "serve.threads=0"], config_dir=REPO / "conf")
    engine = next(iter(build_app(cfg).state.load().values()))
    assert engine.runner.lone_session is None
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == 0
    try:
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # not set: onnxruntime's default, spinning
        spinning = True
    assert spinning


def test_metrics_count_the_guards_answers_too(serve_tiny):
    server = serve_tiny("serve.api_key=sekrit")
    key = {"Authorization": "Bearer sekrit"}

    def count(status):
        r = httpx.get(f"{server.url}/metrics", headers=key, timeout=10)
        line = next(
            (x for x in r.text.splitlines() if x.startswith(f'penwright_http_responses_total{{status="{status}"}}')),
            None,
        )
        return float(line.split()[-1]) if line else 0.0

    before401, before413 = count("401"), count("413")
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}).status_code == 401
    big = httpx.post(f"{server.url}/v1/completions", content=b"x" * 70_000, headers=key)
    assert big.status_code == 413
    assert count("401") == before401 + 1 and count("413") == before413 + 1


def test_a_stream_ends_with_its_last_token_not_at_the_next_stream_interval(serve_tiny):
    """serve.stream_interval merges the pieces that arrive between two chunks; a request that ends during that
    pause ends it, its last chunk sent at once (a 30 s interval here, for a request of a few milliseconds)."""
    import json
    import time

    server = serve_tiny("serve.stream_interval=30")
    body = {"prompt": "The quick", "max_tokens": 20, "min_tokens": 20, "temperature": 0}
    start = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body | {"stream": True}, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert time.monotonic() - start < 15  # well inside one interval: the end did not wait for it
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert "".join(e["choices"][0]["text"] for e in events) == whole
