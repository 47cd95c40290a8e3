"""A fresh server's warm-up (``serve.warm_up``): before it takes a client's request it has answered one of its own,
through the whole app and the engine, which ``/metrics`` does not count; a warm-up that fails does not stop it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from helpers.paths import REPO


class Counting:
    """An engine's real session, counting its runs; while ``failing``, every run raises instead."""

    def __init__(self, session):
        self.session, self.runs, self.failing = session, 0, False

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, binding):
        if self.failing:
            raise RuntimeError("injected failure")
        self.runs += 1
        return self.session.run_with_iobinding(binding)


def app_on(onnx_tiny, *overrides: str, failing: bool = False):
    """The app ``penwright serve`` builds, its engine's session counted (and failing, when asked)."""
    from penwright.core.config import compose
    from penwright.serve import build_app

    app = build_app(compose([f"serve.model_dir={onnx_tiny}", *overrides], config_dir=REPO / "conf"))
    engines = app.state.load()
    (engine,) = engines.values()
    engine.session = counted = Counting(engine.session)
    counted.failing = failing
    app.state.load = lambda: engines
    return app, counted


COUNTED = (  # /metrics' samples that requests add to
    "penwright_requests_finished_total{",
    "penwright_http_responses_total{",
    "penwright_prompt_tokens_total{",
    "penwright_generation_tokens_total{",
    "penwright_time_to_first_token_seconds_count{",
    "penwright_inter_token_latency_seconds_count{",
    "penwright_e2e_request_latency_seconds_count{",
)


def counted_lines(client: TestClient, headers: dict | None = None) -> list[str]:
    """/metrics' lines that count requests, tokens and latencies."""
    text = client.get("/metrics", headers=headers).text
    return [line for line in text.splitlines() if line.startswith(COUNTED)]


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_a_fresh_server_has_run_one_request_of_its_own_and_counts_none_of_it(onnx_tiny, api_key, capfd):
    overrides = [f"serve.api_key={api_key}"] if api_key else []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    app, session = app_on(onnx_tiny, *overrides)
    with TestClient(app) as client:
        assert session.runs >= 2  # a prefill and a decoding step, before any client asked (with the key, when set)
        assert counted_lines(client, headers) == []
        r = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 3, "min_tokens": 3}, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        counts = counted_lines(client, headers)
        assert any('reason="length"' in line and line.endswith(" 1.0") for line in counts), counts
        assert any('status="200"' in line for line in counts), counts
        assert any(line.startswith("penwright_generation_tokens_total{") and line.endswith(" 3.0") for line in counts)
        assert any(
            line.startswith("penwright_e2e_request_latency_seconds_count{") and line.endswith(" 1.0") for line in counts
        )
    assert "warm-up" not in capfd.readouterr().err


def test_warm_up_false_runs_nothing_before_the_first_request(onnx_tiny):
    app, session = app_on(onnx_tiny, "serve.warm_up=false")
    with TestClient(app) as client:
        assert session.runs == 0
        assert client.post("/v1/completions", json={"prompt": "The", "max_tokens": 2}).status_code == 200
        assert session.runs >= 2


def test_a_warm_up_that_fails_is_logged_and_the_server_serves_on(onnx_tiny, capfd):
    app, session = app_on(onnx_tiny, failing=True)
    with TestClient(app) as client:
        err = capfd.readouterr().err
        assert "penwright: the warm-up request failed" in err and "serving anyway" in err, err
        session.failing = False
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 2, "min_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
