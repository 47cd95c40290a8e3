#!/usr/bin/env python3
"""The server's speed at two commits, side by side: does a change cost one-at-a-time requests anything?

    python -m benchmarks.serve_ab BASE_REV [--model artifacts/onnx] [--requests 40] [--rounds 7] [--sample] [--output F]

Each commit's ``src/`` is checked out (``git worktree``) and runs its own ``penwright serve`` on the same
exported model; both servers stay up and take turns, round by round (which goes first alternates too). A
round: ``requests`` completions one after another (greedy, or with ``--sample`` what the serve bench sends:
temperature 0.8, top-k 40, seeded; ``tokens`` new tokens, the prompt "The"), streamed and not streamed, warm
(one untimed request first); completion tokens/s over the round's wall time. Medians over the rounds, and the
median of the per-round ratios (HEAD / BASE).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.ab import REPO, base_tree, order, report, summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(src: Path, model: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "penwright.cli", "serve", f"serve.model_dir={model}", f"serve.port={port}"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server from {src} exited: see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server from {src} did not become healthy: see {log}")


SAMPLED = {"temperature": 0.8, "top_k": 40, "seed": 0}  # what the serve bench sends


def one(client: httpx.Client, url: str, tokens: int, stream: bool, sample: bool = False) -> int:
    body = {"prompt": "The", "max_tokens": tokens, "temperature": 0, "stream": stream, "min_tokens": tokens}
    if sample:
        body.update(SAMPLED)
    if not stream:
        return client.post(f"{url}/v1/completions", json=body).json()["usage"]["completion_tokens"]
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        chunks = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
    return tokens if chunks else 0


def round_rate(client: httpx.Client, url: str, n: int, tokens: int, stream: bool, sample: bool) -> float:
    one(client, url, tokens, stream, sample)
    start, done = time.perf_counter(), 0
    for _ in range(n):
        done += one(client, url, tokens, stream, sample)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the commit to compare HEAD (the working tree) against")
    parser.add_argument("--model", default="artifacts/onnx")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sample", action="store_true", help="sampled requests (the serve bench's), not greedy")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model = str(Path(args.model).resolve())
    results = {}
    with base_tree(args.base) as (tree, scratch):
        servers = {}
        try:
            for name, src in (("base", tree / "src"), ("head", REPO / "src")):
                servers[name] = start(src, model, scratch / f"{name}.log")
            with httpx.Client(timeout=120) as client:
                for stream in (True, False):
                    runs: dict = {"base": [], "head": []}
                    for r in range(args.rounds):
                        for name in order(r):
                            runs[name].append(
                                round_rate(client, servers[name][1], args.requests, args.tokens, stream, args.sample)
                            )
                    key = "streamed" if stream else "not_streamed"
                    results[key] = summary(runs)
                    print(f"{key}: {results[key]}", file=sys.stderr)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    report(
        args.base,
        __doc__,
        args.output,
        model=args.model,
        requests_per_round=args.requests,
        tokens=args.tokens,
        rounds=args.rounds,
        sampled=args.sample,
        levels=results,
    )


if __name__ == "__main__":
    main()
