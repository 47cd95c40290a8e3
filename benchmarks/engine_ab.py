#!/usr/bin/env python3
"""Decode speed of the engine at two commits, side by side: is a change free for requests that do not use it?

    python -m benchmarks.engine_ab BASE_REV [--model artifacts/onnx] [--batches 1,8,32] [--rounds 7] [--sample] [--output F]

Each commit's ``src/`` is checked out (``git worktree``) and imported in a fresh process per measurement;
the two alternate, round by round (which goes first alternates too). A measurement: ``batch`` plain requests
(greedy, no logprobs, no stop strings, ``tokens`` new tokens each, one-token prompt; with ``--sample``, what the
serve bench sends: temperature 0.8, top_k 40, seeded, min_tokens = tokens, the text streamed to a callback)
submitted together and stepped to the end, warm (one untimed run first); tokens/s over the wall time. Medians over the rounds, and
the median of the per-round ratios (HEAD / BASE).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from benchmarks.ab import REPO, base_tree, order, report, summary

CHILD = r"""
import json, sys, time
try:
    from penwright.inference.engine import Engine, Request
    from penwright.inference.sampling import SamplingConfig
except ImportError:  # a commit before the package was laid out by stage
    from penwright.engine import Engine, Request
    from penwright.sampling import SamplingConfig
model, batch, tokens, sample = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
engine = Engine.load(model, slots=batch)
def request(i):
    if not sample:
        return Request([engine.eos], tokens, SamplingConfig(do_sample=False), stop_at_eos=False)
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=40)
    return Request([engine.eos], tokens, cfg, min_tokens=tokens, seed=i, emit=lambda piece, reason: None)
def run():
    reqs = [request(i) for i in range(batch)]
    for r in reqs:
        engine.submit(r)
    start = time.perf_counter()
    while engine.step() or not engine.waiting.empty():
        pass
    return sum(len(r.tokens) for r in reqs) / (time.perf_counter() - start)
run()
print(json.dumps(max(run() for _ in range(3))))
"""


def measure(src: Path, model: str, batch: int, tokens: int, sample: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(batch), str(tokens), str(int(sample))],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the commit to compare HEAD (the working tree) against")
    parser.add_argument("--model", default="artifacts/onnx")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sample", action="store_true", help="sampled, streamed requests (the serve bench's)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    results = {}
    with base_tree(args.base) as (tree, _):
        trees = {"base": tree / "src", "head": REPO / "src"}
        for batch in [int(b) for b in args.batches.split(",")]:
            runs: dict = {"base": [], "head": []}
            for r in range(args.rounds):
                for name in order(r):
                    runs[name].append(measure(trees[name], args.model, batch, args.tokens, args.sample))
            results[str(batch)] = summary(runs)
            print(f"batch {batch}: {results[str(batch)]}", file=sys.stderr)
    report(
        args.base,
        __doc__,
        args.output,
        model=args.model,
        tokens=args.tokens,
        sample=args.sample,
        rounds=args.rounds,
        batches=results,
    )


if __name__ == "__main__":
    main()
