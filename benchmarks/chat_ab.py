#!/usr/bin/env python3
"""Chat completions against completions of the same prompts: does the chat route (its template and its stop
checks) cost anything under load?

    python -m benchmarks.chat_ab [--model artifacts/chat/onnx] [--concurrency 16] [--requests 64]
                                 [--tokens 32] [--rounds 5] [--output benchmarks/results/chat_vs_completions.json]

One ``penwright serve`` on a chat model (``experiment=chat``'s by default). Each round sends ``requests``
streamed requests, at most ``concurrency`` at a time, twice: as chat completions of short conversations, and
as completions of the very prompts the chat template renders for them (``apply_chat_template`` with the
generation prompt), each ``tokens`` tokens long (``min_tokens``: the same work whatever the model writes);
which goes first alternates. Completion tokens/s over each batch's wall time; medians over the rounds and the
median of the per-round ratios (chat / completions).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import BENCH_DIR, log, require_export, write_report
from benchmarks.serve import _level, _Server

CONVERSATIONS = [  # short openings, as a person types them to the persona
    [{"role": "user", "content": "What is man, that he should be clean?"}],
    [{"role": "user", "content": "Hast thou considered my servant?"}],
    [{"role": "user", "content": "How long wilt thou speak these things?"}],
    [{"role": "user", "name": "Bildad", "content": "Doth God pervert judgment?"}],
    [
        {"role": "user", "content": "Art thou the first man that was born?"},
        {"role": "assistant", "content": "I have heard many such things."},
        {"role": "user", "content": "Then answer me."},
    ],
    [{"role": "user", "content": "Where wast thou when I laid the foundations of the earth?"}],
    [{"role": "user", "content": "Should a wise man utter vain knowledge?"}],
    [{"role": "user", "content": "Canst thou by searching find out God?"}],
]


def run(model: Path, concurrency: int, requests: int, tokens: int, rounds: int, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{model}: no chat template; export a chat model first (experiment=chat)")
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    workdir.mkdir(parents=True, exist_ok=True)
    server = _Server(model, slots=concurrency, context=None, log_path=workdir / "serve.log")
    rows: list[dict] = []
    try:
        server.wait()
        asyncio.run(_level(server.url, concurrency, concurrency, tokens, prompts))  # warm: untimed
        asyncio.run(_level(server.url, concurrency, concurrency, tokens, CONVERSATIONS))
        for r in range(rounds):
            row = {}
            for kind in ("chat", "completions") if r % 2 == 0 else ("completions", "chat"):
                level = asyncio.run(
                    _level(server.url, concurrency, requests, tokens, CONVERSATIONS if kind == "chat" else prompts)
                )
                if level["failed"]:
                    raise SystemExit(f"{kind}: {level['failed']} requests failed: {level['errors']}")
                row[kind] = level["tokens_per_sec"]
            row["ratio"] = round(row["chat"] / row["completions"], 3)
            log(f"round {r + 1}/{rounds}: chat {row['chat']} tok/s, completions {row['completions']} tok/s")
            rows.append(row)
    finally:
        server.stop()
    return {
        "what": "chat completions vs completions of the same rendered prompts, streamed, one server",
        "model": str(model),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "concurrency": concurrency,
        "requests_per_round": requests,
        "tokens_per_request": tokens,
        "rounds": rows,
        "chat_tokens_per_sec_median": statistics.median(r["chat"] for r in rows),
        "completions_tokens_per_sec_median": statistics.median(r["completions"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chat_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="artifacts/chat/onnx", help="an exported chat model (experiment=chat's)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per kind per round")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output", default=None, help="default: benchmarks/results/chat_vs_completions.json")
    args = p.parse_args()
    model = require_export(args.model)
    results = run(model, args.concurrency, args.requests, args.tokens, args.rounds, Path(BENCH_DIR) / "chat_ab")
    summary = {
        k: results[k] for k in ("chat_tokens_per_sec_median", "completions_tokens_per_sec_median", "ratio_median")
    }
    write_report(results, args.output, "benchmarks/results/chat_vs_completions.json", summary)


if __name__ == "__main__":
    main()
