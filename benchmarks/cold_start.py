"""``python -m benchmarks cold``: freshly started servers, cold and warm, side by side with llama.cpp's llama-server.

For each start (``--starts``, 5 by default) both servers are started fresh, one after the other (the order
alternates), on the same weights (penwright's graph and its f32 GGUF export), 32 slots of 256 tokens: the
start-up time (process start to the first answer of ``/health``), the very first request's time to first
token, then at each level c (1, 4, 16, 32 for the GPT-2-124M shape; 1, 4, 16 for the quickstart) three
rounds of 2c streamed completions of 64 tokens (c clients, each sending its next request when the last ends;
temperature 0.8, top-k 40, min_tokens / ignore_eos): the first round at a level is the cold one. Cold figures
are pooled over the starts (one round has too few first tokens for a p95 of its own), warm ones over the other
rounds; tokens/s are medians of rounds. Every first-token time is kept, for the distribution (deciles, and
the page's plot).
Goals: cold within 10% (or 5 ms) of warm, p95 first token at or below llama-server's, tokens/s >= 1.5x
llama-server's at 16 and 32, cold and warm.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BENCH_DIR, log, require_export, save_fused, with_earlier_models, write_report
from benchmarks.serve import _level, _LlamaServer, _Server, text_gpt2
from penwright.core.errors import PenwrightError

LEVELS = {"gpt2-124m-shape": (1, 4, 16, 32), "quickstart": (1, 4, 16)}
ROUNDS = 3  # at each level: the first is cold
NEW_TOKENS = 64
SLOTS, CONTEXT = 32, 256
REPORT = "benchmarks/results/bench_cold.json"


def _models(work: Path, quick_onnx: Path, quick_hf: Path, names: tuple[str, ...]) -> dict[str, tuple[Path, Path]]:
    """name -> (penwright's folder, the f32 GGUF of the same weights)."""
    from transformers import GPT2LMHeadModel

    from penwright.export.gguf import export_gguf

    out = {}
    for name in names:
        if name == "quickstart":
            folder = work / "quickstart-onnx"
            shutil.copytree(quick_onnx, folder)
            model = GPT2LMHeadModel.from_pretrained(quick_hf).eval()
        else:
            model, tokenizer = text_gpt2(quick_onnx)
            folder = save_fused(model, tokenizer, work / f"{name}-onnx")
        gguf = folder / export_gguf(model, quick_onnx, folder, ["f32"])[0]["file"]
        out[name] = (folder, gguf)
    return out


def _one_start(server, levels: tuple[int, ...]) -> dict:
    """Start-up, the first request, then cold and warm rounds at each level, on one freshly started server."""
    begin = time.perf_counter()
    server.wait()
    startup = time.perf_counter() - begin
    first = asyncio.run(_level(server.url, 1, 1, NEW_TOKENS, keep=True))
    asyncio.run(_level(server.url, 1, 1, NEW_TOKENS))  # (a second warm-up request, as a user's script sends)
    rounds = {
        c: [asyncio.run(_level(server.url, c, 2 * c, NEW_TOKENS, keep=True)) for _ in range(ROUNDS)] for c in levels
    }
    return {
        "startup_s": round(startup, 2),
        "first_ttft_s": first["ttfts"][0] if first["ttfts"] else None,
        "rounds": rounds,
    }


def _pool(rounds: list[dict]) -> dict:
    ttfts = sorted(t for r in rounds for t in r["ttfts"])
    return {
        "tokens_per_sec": round(float(np.median([r["tokens_per_sec"] for r in rounds])), 1),
        "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4) if ttfts else None,
        "ttft_p95_s": round(float(np.percentile(ttfts, 95)), 4) if ttfts else None,
        "ttft_deciles_s": [round(float(np.percentile(ttfts, q)), 4) for q in range(10, 101, 10)] if ttfts else [],
        "ttfts_s": [round(t, 4) for t in ttfts],  # every first-token time, sorted (the page plots them)
        "first_tokens": len(ttfts),
        "failed": sum(r["failed"] for r in rounds),
    }


def bench_cold(
    output: str | None = None,
    starts: int = 5,
    llama_cpp: str | Path = ".llama.cpp/bin",
    models: tuple[str, ...] = ("quickstart", "gpt2-124m-shape"),
    quick_onnx: str = "artifacts/onnx",
    quick_hf: str = "artifacts/model",
    variant: tuple[str, ...] = (),
) -> dict:
    """``variant``: ``penwright serve`` overrides for a third server in the turns (e.g. ``serve.threads=0``), kept
    as the model's ``variant`` entry beside the default's."""
    binary = Path(llama_cpp) / "llama-server"
    if not binary.is_file():
        raise PenwrightError(
            f"{binary}: not found. Build it with `scripts/build_llama_cpp.sh` (about 15 min on 2 cores)"
        )
    work = Path(BENCH_DIR) / "cold"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "starts": starts,
        "slots": SLOTS,
        "context": CONTEXT,
        "new_tokens": NEW_TOKENS,
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    try:
        for name, (folder, gguf) in _models(work, require_export(quick_onnx), Path(quick_hf), models).items():
            levels = LEVELS[name]
            runs: dict[str, list[dict]] = {"penwright": [], "llama_server": []}
            if variant:
                runs["variant"] = []
            for k in range(starts):
                order = list(runs) if k % 2 == 0 else list(runs)[::-1]
                for label in order:
                    log(f"{name}: start {k + 1}/{starts}, {label}")
                    logfile = work / f"{name}-{label}-{k}.log"
                    server = (
                        _Server(folder, SLOTS, CONTEXT, logfile, extra=variant if label == "variant" else ())
                        if label != "llama_server"
                        else _LlamaServer(binary, gguf, SLOTS, CONTEXT, logfile)
                    )
                    try:
                        runs[label].append(_one_start(server, levels))
                    finally:
                        server.stop()
            entry: dict = {}
            for label, starts_ in runs.items():
                entry[label] = {
                    "startup_s": round(float(np.median([s["startup_s"] for s in starts_])), 2),
                    "first_request_ttft_s": round(float(np.median([s["first_ttft_s"] for s in starts_])), 4),
                    "levels": {
                        str(c): {
                            "cold": _pool([s["rounds"][c][0] for s in starts_]),
                            "warm": _pool([r for s in starts_ for r in s["rounds"][c][1:]]),
                        }
                        for c in levels
                    },
                }
            if variant:
                entry["variant"]["overrides"] = list(variant)
            for c in levels:
                ours, theirs = entry["penwright"]["levels"][str(c)], entry["llama_server"]["levels"][str(c)]
                entry.setdefault("ratios", {})[str(c)] = {
                    phase: round(ours[phase]["tokens_per_sec"] / max(theirs[phase]["tokens_per_sec"], 1e-9), 2)
                    for phase in ("cold", "warm")
                }
            results["models"][name] = entry | {"date": time.strftime("%Y-%m-%d"), "starts": starts}
            log(f"{name}: {json.dumps(entry['ratios'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["models"] = with_earlier_models(results["models"], output, REPORT)
    summary = {
        name: {
            c: {
                phase: [
                    e["ratios"][c][phase],
                    e["penwright"]["levels"][c][phase]["ttft_p95_s"],
                    e["llama_server"]["levels"][c][phase]["ttft_p95_s"],
                ]
                for phase in ("cold", "warm")
            }
            for c in e["ratios"]
        }
        for name, e in results["models"].items()
    }
    write_report(results, output, REPORT, summary)
    return results
