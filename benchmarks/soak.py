"""``python -m benchmarks soak``: a server's resident memory over 10,000 requests -> benchmarks/results/bench_soak.json.

One ``penwright serve`` per model (the quickstart export, and a GPT-2-124M-shaped one), 32 slots of 256 tokens,
takes ``--requests`` streamed completions (10,000 by default) of 8 new tokens each, 16 at a time, in rounds of
1,000; its resident set size (RSS) is read after each round. The goal: RSS after the last round within 5% of RSS
after the first, and every request answered.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, fresh_dir, log, require_export, with_earlier_models, write_report
from benchmarks.serve import _level, _random_124m_onnx, _Server

REPORT = "benchmarks/results/bench_soak.json"
ROUND = 1000  # requests between two readings of RSS
CONCURRENCY = 16
NEW_TOKENS = 8
SLOTS, CONTEXT = 32, 256
GOAL = 1.05  # RSS after the last round / after the first


def _soak(model_dir: Path, requests: int, log_path: Path) -> dict:
    server = _Server(model_dir, SLOTS, CONTEXT, log_path)
    try:
        server.wait()
        rounds = []
        for k in range(0, requests, ROUND):
            n = min(ROUND, requests - k)
            result = asyncio.run(_level(server.url, CONCURRENCY, n, NEW_TOKENS))
            rounds.append(
                {
                    "after_requests": k + n,
                    "rss_mb": server.rss_mb(),
                    "answered": result["answered"],
                    "failed": result["failed"],
                    "tokens_per_sec": result["tokens_per_sec"],
                }
            )
            log(f"{model_dir.name}: {k + n} requests, RSS {rounds[-1]['rss_mb']} MB, {result['failed']} failed")
    finally:
        server.stop()
    first, last = rounds[0]["rss_mb"], rounds[-1]["rss_mb"]
    return {
        "rounds": rounds,
        "rss_first_round_mb": first,
        "rss_last_round_mb": last,
        "rss_growth": round(last / first, 4),
        "answered": sum(r["answered"] for r in rounds),
        "failed": sum(r["failed"] for r in rounds),
        "within_goal": last / first <= GOAL and all(r["failed"] == 0 for r in rounds),
    }


MODELS = ("quickstart", "gpt2-124m-shape")


def bench_soak(
    output: str | None = None,
    requests: int = 10_000,
    models: tuple[str, ...] = MODELS,
    onnx_dir: str = "artifacts/onnx",
) -> Path:
    import platform

    quick = require_export(onnx_dir)
    work = fresh_dir(BENCH_DIR / "soak")
    try:
        started = time.time()
        results = {}
        for name in models:
            folder = quick if name == "quickstart" else _random_124m_onnx(work, quick)
            results[name] = _soak(folder, requests, work / f"{name}.log") | {
                "date": time.strftime("%Y-%m-%d", time.gmtime(started))
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = with_earlier_models(results, output, REPORT)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "setup": {
            "requests": requests,
            "round": ROUND,
            "concurrency": CONCURRENCY,
            "new_tokens": NEW_TOKENS,
            "slots": SLOTS,
            "context": CONTEXT,
            "goal_rss_growth": GOAL,
        },
        "models": results,
    }
    summary = {
        name: {k: r[k] for k in ("rss_first_round_mb", "rss_last_round_mb", "rss_growth", "failed")}
        for name, r in results.items()
    }
    return write_report(report, output, REPORT, summary)
