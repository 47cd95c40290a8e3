"""``python -m benchmarks serve``: the real server under concurrent load, continuous batching vs one at a time.

Two ``penwright serve`` processes run on the same exported model, side by side on loopback: one
with ``serve.max_sequences`` slots (continuous batching) and one with a single slot (each request
served alone, in arrival order: what gpt-2-cloud-run did). At each concurrency level (1, 4, 16,
64) the same streamed requests (varied prompts, a fixed number of new tokens, ``min_tokens`` so no
request stops early) go to one server then the other. For each: completion tokens/s over the
level's wall time, p50/p95 latency, p50/p95 time to first token, and requests sent / answered /
failed. Models: the quickstart (``artifacts/onnx``) and a GPT-2-124M-shaped one with random
weights. Results: ``benchmarks/results/bench_serve.json``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BENCH_DIR, SHAPE_124M, log, random_gpt2, require_export, save_fused, write_report
from penwright.core.errors import PenwrightError

PROMPTS = [
    "And it came to pass",
    "The LORD said unto",
    "In the beginning",
    "Blessed are they",
    "And he said",
    "Now these are the generations of",
    "Behold,",
    "Then answered",
    "For God so",
    "Thus saith the",
]
LEVELS = (1, 4, 16, 64)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``penwright serve`` in a subprocess, started at once; ``wait()`` until it is healthy; ``stop()`` (SIGTERM)."""

    def __init__(self, model_dir: Path, slots: int, context: int | None, log_path: Path, extra: tuple[str, ...] = ()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        overrides = [
            f"serve.model_dir={model_dir}",
            f"serve.port={self.port}",
            f"serve.max_sequences={slots}",
            "serve.queue_size=4096",
            "serve.request_timeout=900",
        ]
        if context:
            overrides.append(f"serve.context={context}")
        overrides += list(extra)
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "penwright.cli", "serve", *overrides], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.terminated = False

    def wait(self) -> None:
        from benchmarks.common import wait_until_healthy

        try:
            wait_until_healthy(self.url, 180, self.proc)
        except PenwrightError as err:
            raise PenwrightError(f"{err}; see {self.log_path}") from None

    def rss_mb(self) -> float:
        import psutil

        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def terminate(self) -> None:
        """SIGTERM, once (uvicorn takes a second one as "exit now")."""
        if not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """Its exit code after SIGTERM."""
        self.terminate()
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


async def _one(session, url: str, prompt: str | list[dict], new_tokens: int, seed: int) -> dict:
    """One streamed request of ``new_tokens`` tokens: a completion of a text ``prompt``, or a chat completion
    of ``prompt`` given as messages."""
    chat = isinstance(prompt, list)
    body = {
        "messages" if chat else "prompt": prompt,
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "ignore_eos": True,  # llama-server's way to the same fixed length (penwright ignores the field)
        "temperature": 0.8,
        "top_k": 40,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens, chunks, error = None, 0, 0, None
    try:
        async with session.post(f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body) as response:
            if response.status != 200:
                error = f"HTTP {response.status}"
            else:
                async for line in response.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    choice = (event.get("choices") or [{}])[0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - start
                tokens = tokens or chunks  # a server that sends no usage: one token a chunk (llama-server)
    except Exception as err:  # a refused or broken connection is a failed request, counted
        error = f"{type(err).__name__}: {err}"
    return {
        "latency": time.perf_counter() - start,
        "ttft": first,
        "tokens": tokens,
        "error": error or (None if tokens == new_tokens else f"{tokens} tokens instead of {new_tokens}"),
    }


async def _level(
    url: str, concurrency: int, requests: int, new_tokens: int, prompts: list | None = None, keep: bool = False
) -> dict:
    """``requests`` streamed completions of ``prompts`` (default ``PROMPTS``; a list of messages is a chat
    completion), at most ``concurrency`` at a time (aiohttp: a light client, so the load generator takes little of
    the cores the server runs on)."""
    prompts = prompts or PROMPTS
    gate = asyncio.Semaphore(concurrency)
    # no garbage collection while the round runs: this process holds torch and transformers, and one full
    # collection takes ~0.2 s here (measured), stalling every stream at once: it showed up as groups of requests
    # with the same first-token time, a server's cold round looking slow for what was the load generator's pause
    gc.disable()
    try:
        return await _round(url, concurrency, requests, new_tokens, prompts, keep, gate)
    finally:
        gc.enable()


async def _round(
    url: str, concurrency: int, requests: int, new_tokens: int, prompts: list, keep: bool, gate: asyncio.Semaphore
) -> dict:
    import aiohttp

    # a connection per request: llama-server closes idle keep-alive connections, which a pooled client then
    # writes to and fails on (measured: up to 35 of 64 requests); both servers pay the same loopback connect
    connector = aiohttp.TCPConnector(limit=concurrency + 4, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:

        async def gated(i):
            async with gate:
                return await _one(session, url, prompts[i % len(prompts)], new_tokens, seed=i)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]

    def pct(values, q):
        return round(float(np.percentile(values, q)), 3) if values else None

    return {
        **({"ttfts": sorted(ttft)} if keep else {}),  # (keep: every first-token time, for pooling and deciles)
        "concurrency": concurrency,
        "sent": requests,
        "answered": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:3],
        "completion_tokens": sum(r["tokens"] for r in ok),
        "wall_s": round(wall, 2),
        "tokens_per_sec": round(sum(r["tokens"] for r in ok) / wall, 1),
        "latency_p50_s": pct(lat, 50),
        "latency_p95_s": pct(lat, 95),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
    }


def _random_124m_onnx(workdir: Path, tokenizer_dir: Path, shape: tuple[int, int, int] = SHAPE_124M) -> Path:
    """A GPT-2-124M-shaped model (random weights; ``shape`` for another) exported to penwright's fused graph,
    nothing else."""
    import torch
    from transformers import AutoTokenizer

    model = random_gpt2(shape)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():  # ids past the borrowed tokenizer's vocab get zero logits (the head is tied to wte): the
        model.transformer.wte.weight[len(tokenizer) :] = 0  # sampled tokens are text, so time to first text is real
    return save_fused(model, tokenizer, workdir / "gpt2-124m-random-onnx")


MODELS = ("quickstart", "gpt2-124m-shape")


def bench_serve(
    output: str | None = None,
    quick_onnx: str = "artifacts/onnx",
    slots: int = 64,
    levels: tuple[int, ...] = LEVELS,
    *,
    models: tuple[str, ...] = MODELS,
    new_tokens: int | None = None,
    big_shape: tuple[int, int, int] = SHAPE_124M,
    work_dir: str | Path | None = None,
) -> dict:
    """The measurements above. ``models``: which of the two (both); ``new_tokens``: tokens a request (default
    128 for the quickstart, 64 for the 124M shape); ``big_shape``: (n_layer, n_head, n_embd) of the random
    model (GPT-2 124M's); ``work_dir``: scratch space and the servers' logs (default artifacts/bench/serve)."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise PenwrightError(f"bench serve: no model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    quick = require_export(quick_onnx)
    work = Path(work_dir or BENCH_DIR / "serve")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {
        "machine": {"cpus": os.cpu_count()},
        "measured": "the real server (uvicorn) on loopback, streamed completions with min_tokens = max_tokens so "
        "every request generates the same number of tokens; at each concurrency level the same requests "
        "go to the batching server, then to the one-slot server (one at a time, in arrival order); "
        "tokens/s = completion tokens of answered requests / the level's wall time; "
        "ttft = time to the first streamed text",
        "goals": "concurrency 16: batching >= 4x one-at-a-time tokens/s and p95 ttft < 1 s; every request answered",
        "models": {},
    }
    try:
        # (model, new tokens a request, serve.context, server overrides): the servers run serve's defaults
        # (serve.threads=auto: all cores, spinning; what served both models fastest at concurrency 1-32)
        cases = {
            "quickstart": (quick, 128, None, ()),
            "gpt2-124m-shape": (None, 64, 256, ()),
        }
        for name, (model_dir, tokens, context, extra) in cases.items():
            if name not in models:
                continue
            tokens = new_tokens or tokens
            if model_dir is None:
                log("building a GPT-2-124M-shaped model (random weights)")
                model_dir = _random_124m_onnx(work, quick, big_shape)
            batching = _Server(model_dir, slots, context, work / f"{name}-batching.log", extra)
            single = _Server(model_dir, 1, context, work / f"{name}-single.log", extra)
            entry = {"new_tokens_per_request": tokens, "slots": slots, "server_overrides": list(extra), "levels": {}}
            try:
                batching.wait()
                single.wait()
                for c in levels:
                    n = max(4 * c, 8) if name == "quickstart" else max(2 * c, 4)  # several waves: ramps amortized
                    row = {}
                    for label, server in (("batching", batching), ("one_at_a_time", single)):
                        log(f"{name}: {n} requests at concurrency {c} -> {label}")
                        row[label] = asyncio.run(_level(server.url, c, n, tokens))
                    row["batching_over_one_at_a_time"] = round(
                        row["batching"]["tokens_per_sec"] / max(row["one_at_a_time"]["tokens_per_sec"], 1e-9), 2
                    )
                    entry["levels"][str(c)] = row
                    log(
                        f"  batching {row['batching']['tokens_per_sec']} tok/s, one at a time "
                        f"{row['one_at_a_time']['tokens_per_sec']} tok/s: {row['batching_over_one_at_a_time']}x; "
                        f"p95 ttft {row['batching']['ttft_p95_s']} s"
                    )
                entry["server_rss_mb"] = {"batching": batching.rss_mb(), "one_at_a_time": single.rss_mb()}
            finally:
                batching.terminate()  # both stop at once
                single.terminate()
                entry["exit_codes_on_sigterm"] = {"batching": batching.stop(), "one_at_a_time": single.stop()}
            results["models"][name] = entry
    finally:
        shutil.rmtree(work / "gpt2-124m-random-onnx", ignore_errors=True)
    summary = {
        m: {
            c: {
                "x": r["batching_over_one_at_a_time"],
                "tok/s": r["batching"]["tokens_per_sec"],
                "p95_ttft": r["batching"]["ttft_p95_s"],
                "failed": r["batching"]["failed"] + r["one_at_a_time"]["failed"],
            }
            for c, r in e["levels"].items()
        }
        for m, e in results["models"].items()
    }
    write_report(results, output, "benchmarks/results/bench_serve.json", summary)
    return results


# -- against llama.cpp's server ---------------------------------------------------------------------------

LLAMA_LEVELS = {"quickstart": (1, 4, 16), "gpt2-124m-shape": (1, 4, 16, 32)}
# (precision, penwright's graph, llama.cpp's GGUF type): the same weights, as each server runs them
LLAMA_PRECISIONS = (("fp32", "model.onnx", "f32"), ("q8", "model.q8.onnx", "q8_0"))


class _LlamaServer(_Server):
    """llama.cpp's ``llama-server`` on a GGUF file: ``slots`` parallel sequences (``-np``) of ``context`` tokens
    each, continuous batching (its default), all cores."""

    def __init__(self, binary: Path, gguf: Path, slots: int, context: int, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["-np", str(slots), "-c", str(slots * context), "-t", str(os.cpu_count() or 1), "--no-webui"]
        if _has_amx():  # llama.cpp's weight repacking crashes on AMX CPUs
            cmd.append("--no-repack")
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.terminated = False


def text_gpt2(tokenizer_dir: Path, shape: tuple[int, int, int] = SHAPE_124M):
    """A GPT-2 of ``shape`` with random weights that writes text: the ids past the borrowed tokenizer's vocab are
    zeroed (they never come up) and its end of text is the tokenizer's. Returns (model, tokenizer)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = random_gpt2(shape)
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    with torch.no_grad():
        model.transformer.wte.weight[len(tokenizer) :] = 0
    return model, tokenizer


def _has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _median_level(runs: list[dict]) -> dict:
    """The repetitions of one level on one server: medians of tokens/s and latencies, sums of the counts."""

    def med(key):
        values = [r[key] for r in runs if r[key] is not None]
        return round(float(np.median(values)), 3) if values else None

    return {
        "concurrency": runs[0]["concurrency"],
        "repetitions": len(runs),
        "sent": sum(r["sent"] for r in runs),
        "answered": sum(r["answered"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "errors": sorted({e for r in runs for e in r["errors"]})[:3],
        "tokens_per_sec": med("tokens_per_sec"),
        "tokens_per_sec_each": [r["tokens_per_sec"] for r in runs],
        "ttft_p50_s": med("ttft_p50_s"),
        "ttft_p95_s": med("ttft_p95_s"),
        "latency_p95_s": med("latency_p95_s"),
    }


def _kept_and_rerun(earlier: dict, rerun: dict) -> dict:
    """The report's ``models`` after a run of some of them: a model or precision not rerun keeps its last
    measurement (each entry has its date, each level its repetitions); a rerun one is replaced."""
    merged = {model: dict(by) for model, by in earlier.items()}
    for model, by in rerun.items():
        merged.setdefault(model, {}).update(by)
    return merged


def bench_serve_llama(
    output: str | None = None,
    quick_onnx: str = "artifacts/onnx",
    quick_hf: str = "artifacts/model",
    llama_cpp: str | Path = ".llama.cpp/bin",
    repetitions: int = 3,
    *,
    models: tuple[str, ...] = MODELS,
    precisions: tuple[str, ...] = ("fp32", "q8"),
    new_tokens: int = 64,
    slots: int = 32,
    big_shape: tuple[int, int, int] = SHAPE_124M,
    levels: dict | None = None,
    work_dir: str | Path | None = None,
) -> dict:
    """penwright serve against llama.cpp's llama-server on the same weights (penwright's GGUF export), the same
    streamed requests, the servers taking turns at each level, ``repetitions`` times; medians. Writes the
    ``llama_server`` section of benchmarks/results/bench_serve.json (the rest of the report is kept)."""
    from transformers import GPT2LMHeadModel

    from penwright.export.gguf import export_gguf
    from penwright.export.quantize import quantize

    binary = Path(llama_cpp) / "llama-server"
    if not binary.is_file():
        raise PenwrightError(
            f"{binary}: not found. Build it with `scripts/build_llama_cpp.sh` (about 10 min on 2 cores) or point "
            "--llama-cpp at a llama.cpp build's bin/ folder"
        )
    quick = require_export(quick_onnx)
    work = Path(work_dir or BENCH_DIR / "serve-llama")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    levels = levels or LLAMA_LEVELS
    section: dict = {
        "measured": "penwright serve (its defaults, serve.max_sequences=slots) and llama-server (-np slots, "
        "continuous batching, -t all cores) on the same weights (penwright's GGUF export of the same model); "
        "streamed completions of new_tokens tokens each (min_tokens and ignore_eos so none stops early), "
        "temperature 0.8, top_k 40; at each level the servers take turns, repetitions times, alternating "
        "which goes first; medians; loopback. repetitions: this run's; each level records its own, and each "
        "model and precision its date (one not rerun keeps its last measurement)",
        "goals": "124M shape, fp32: penwright/llama-server tokens/s >= 1.0 / 1.3 / 1.5 / 1.5 at 1 / 4 / 16 / 32 "
        "and p95 ttft <= llama-server's at every level; quickstart at 1: >= 1.0",
        "new_tokens": new_tokens,
        "slots": slots,
        "repetitions": repetitions,
        "models": {},
    }
    try:
        for name in models:
            if name == "quickstart":
                hf, onnx_dir, context = Path(quick_hf), work / "quickstart-onnx", None
                shutil.copytree(quick, onnx_dir)
                model = GPT2LMHeadModel.from_pretrained(hf).eval()
                tokenizer_dir = quick
            else:
                model, tokenizer = text_gpt2(quick, big_shape)
                onnx_dir, context, tokenizer_dir = save_fused(model, tokenizer, work / f"{name}-onnx"), 256, quick
            per_slot = context or int(model.config.n_positions)
            for precision, graph, qtype in LLAMA_PRECISIONS:
                if precision not in precisions:
                    continue
                if not (onnx_dir / graph).is_file():
                    quantize(onnx_dir / "model.onnx", graph.split(".")[1])
                gguf = onnx_dir / export_gguf(model, tokenizer_dir, onnx_dir, [qtype])[0]["file"]
                extra = (f"serve.graph={graph}",)
                ours = _Server(onnx_dir, slots, context, work / f"{name}-{precision}-penwright.log", extra)
                theirs = _LlamaServer(binary, gguf, slots, per_slot, work / f"{name}-{precision}-llama.log")
                entry = {"gguf": gguf.name, "graph": graph, "date": time.strftime("%Y-%m-%d"), "levels": {}}
                try:
                    ours.wait()
                    theirs.wait()
                    for c in levels[name]:
                        n = max(2 * c, 4)
                        runs: dict = {"penwright": [], "llama_server": []}
                        for rep in range(repetitions):
                            order = [("penwright", ours), ("llama_server", theirs)]
                            for label, server in order if rep % 2 == 0 else order[::-1]:
                                log(f"{name} {precision}: {n} requests at concurrency {c} -> {label} ({rep + 1})")
                                runs[label].append(asyncio.run(_level(server.url, c, n, new_tokens)))
                        row = {label: _median_level(r) for label, r in runs.items()}
                        row["penwright_over_llama_server"] = round(
                            row["penwright"]["tokens_per_sec"] / max(row["llama_server"]["tokens_per_sec"], 1e-9), 2
                        )
                        entry["levels"][str(c)] = row
                        log(
                            f"  penwright {row['penwright']['tokens_per_sec']} tok/s (p95 ttft "
                            f"{row['penwright']['ttft_p95_s']} s), llama-server {row['llama_server']['tokens_per_sec']} "
                            f"tok/s ({row['llama_server']['ttft_p95_s']} s): {row['penwright_over_llama_server']}x"
                        )
                    entry["server_rss_mb"] = {"penwright": ours.rss_mb(), "llama_server": theirs.rss_mb()}
                finally:
                    ours.terminate()
                    theirs.terminate()
                    ours.stop()
                    theirs.stop()
                section["models"].setdefault(name, {})[precision] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(output or "benchmarks/results/bench_serve.json")
    results = json.loads(out.read_text()) if out.is_file() else {}
    section["models"] = _kept_and_rerun(results.get("llama_server", {}).get("models", {}), section["models"])
    results["llama_server"] = section
    summary = {
        f"{m}/{p}": {
            c: [r["penwright_over_llama_server"], r["penwright"]["ttft_p95_s"], r["llama_server"]["ttft_p95_s"]]
            for c, r in e["levels"].items()
        }
        for m, by in section["models"].items()
        for p, e in by.items()
    }
    write_report(results, out, "benchmarks/results/bench_serve.json", summary)
    return section
