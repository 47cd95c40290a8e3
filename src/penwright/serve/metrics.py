"""``GET /metrics``: the server's state and latencies in Prometheus' text format (``prometheus-client``).

Per model (label ``model``):

* ``penwright_requests_running`` / ``penwright_requests_waiting``: sequences in slots / queued (gauges,
  read from the engine at scrape time), ``penwright_slots`` and ``penwright_slot_usage`` (running / slots);
* ``penwright_prompt_tokens_total`` / ``penwright_generation_tokens_total``: tokens prefilled / generated;
* ``penwright_requests_finished_total{reason}``: sequences ended (stop, length, cancelled, timeout, error);
* histograms ``penwright_time_to_first_token_seconds`` (queued -> first token),
  ``penwright_inter_token_latency_seconds`` (one observation a sequence: its mean time between tokens)
  and ``penwright_e2e_request_latency_seconds`` (queued -> last token).

And ``penwright_http_responses_total{status}``: every HTTP answer by status code (errors included).
Each app has its own registry, so several apps in one process do not share counts.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from penwright.inference.engine import Engine, Request

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class _Engines:
    """A collector reading each engine's slots at scrape time."""

    def __init__(self, engines: dict[str, Engine]):
        self.engines = engines

    def collect(self):
        running = GaugeMetricFamily("penwright_requests_running", "sequences in slots", labels=["model"])
        waiting = GaugeMetricFamily("penwright_requests_waiting", "sequences queued for a slot", labels=["model"])
        slots = GaugeMetricFamily("penwright_slots", "slots (serve.max_sequences)", labels=["model"])
        usage = GaugeMetricFamily("penwright_slot_usage", "running / slots", labels=["model"])
        for name, engine in self.engines.items():
            n = engine.running
            running.add_metric([name], n)
            waiting.add_metric([name], engine.waiting.qsize())
            slots.add_metric([name], engine.slots)
            usage.add_metric([name], n / engine.slots)
        yield from (running, waiting, slots, usage)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.engines: dict[str, Engine] = {}
        r.register(_Engines(self.engines))
        self.prompt_tokens = Counter("penwright_prompt_tokens", "prompt tokens prefilled", ["model"], registry=r)
        self.generation_tokens = Counter("penwright_generation_tokens", "tokens generated", ["model"], registry=r)
        self.finished = Counter(
            "penwright_requests_finished", "sequences ended, by reason", ["model", "reason"], registry=r
        )
        self.ttft = Histogram(
            "penwright_time_to_first_token_seconds",
            "from queued to the first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "penwright_inter_token_latency_seconds",
            "a sequence's mean time between its tokens",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "penwright_e2e_request_latency_seconds",
            "from queued to the last token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.responses = Counter("penwright_http_responses", "HTTP answers by status code", ["status"], registry=r)
        self.counted = (  # every count and observation (clear() forgets them)
            self.prompt_tokens,
            self.generation_tokens,
            self.finished,
            self.ttft,
            self.itl,
            self.e2e,
            self.responses,
        )

    def clear(self) -> None:
        """Forget every count and observation (the server's own warm-up request)."""
        for metric in self.counted:
            metric.clear()

    def submitted(self, model: str, request: Request) -> None:
        self.prompt_tokens.labels(model).inc(len(request.prompt_ids))

    def ended(self, model: str, request: Request) -> None:
        """A sequence ended (called on the engine's thread, from its emit)."""
        now = time.monotonic()
        self.finished.labels(model, request.finish_reason or "unknown").inc()
        n = len(request.tokens)
        if n:
            self.generation_tokens.labels(model).inc(n)
        start = request.queued_at
        if start is None:
            return
        self.e2e.labels(model).observe(now - start)
        if request.first_token_at is not None:
            self.ttft.labels(model).observe(request.first_token_at - start)
            if n > 1:
                self.itl.labels(model).observe((now - request.first_token_at) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
