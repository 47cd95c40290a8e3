"""``penwright bench <stage>``: measure a stage side by side with its baseline, write reports/bench_<stage>.json.

Each measured run happens in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own.

prepare:
* encoder throughput on the sample corpus: the fast tokenizer's batch API (baseline) vs the
  splintr encoder prepare uses when it gives identical ids (on every core), and splintr on one
  thread (how far it scales on this machine);
* the whole stage on the sample corpus (quickstart config: BPE training included), and on
  generated corpora of ~20 MB and ``--size-mb`` MB (verses of the sample drawn at random into 1 MB
  files), tokenized with the quickstart tokenizer: MB/s and peak RSS for each, to show RSS stays
  flat as the corpus grows.

generate (see ``bench_generate``): this runtime against ``transformers`` generate and against itself
without a cache; then against llama.cpp (its own ``llama-bench`` and ``llama-batched-bench``, built by
``scripts/build_llama_cpp.sh``) on the same weights exported as GGUF, at fp32, 8 and 4 bits, with each
quantization's top-1 agreement with fp32 on validation windows.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from penwright.errors import PenwrightError
from penwright.fsutil import atomic_write_text

BENCH_DIR = Path("artifacts") / "bench"


def _fresh_dir(path: Path) -> Path:
    """An empty scratch directory for one benchmark (removed again when it ends)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _child_prepare(overrides: list[str]) -> dict:
    """Run in a subprocess: one prepare, timed, with the process's own peak RSS."""
    from penwright.config import compose
    from penwright.prepare import prepare

    start = time.perf_counter()
    meta = prepare(compose(overrides))
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 3),
        "mb": round(meta["data"]["bytes"] / 1e6, 2),
        "mb_per_s": round(meta["data"]["bytes"] / 1e6 / seconds, 2),
        "tokens": meta["train"]["tokens"] + meta["val"]["tokens"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "encoder": meta["tokenizer"]["encoder"],
    }


def _child_encoders(tokenizer_dir: str, corpus: str, baseline: bool = True) -> dict:
    """Run in a subprocess: both encoders (splintr alone without ``baseline``) on the same texts,
    best of 3 each, ids compared."""
    from transformers import AutoTokenizer

    from penwright.tokenizer import fast_encoder, tokenizers_batch

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(corpus).glob("*.txt"))]
    size = sum(len(t.encode("utf-8")) for t in texts)
    fast = fast_encoder(tok)  # as prepare runs it (threads: RAYON_NUM_THREADS, default one per core)
    if fast is None:
        raise PenwrightError(f"{tokenizer_dir}: splintr cannot express this tokenizer; nothing to compare")
    encoders = {"splintr": fast}
    if baseline:
        encoders["tokenizers_encode_batch_fast"] = tokenizers_batch(tok)
    out, ids = {}, {}
    for name, encode in encoders.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            ids[name] = encode(texts)
            best = min(best, time.perf_counter() - start)
        out[name] = {"seconds": round(best, 3), "mb_per_s": round(size / 1e6 / best, 2)}
    fast.close()
    if baseline:
        out["identical_ids"] = [a.tolist() for a in ids["splintr"]] == ids["tokenizers_encode_batch_fast"]
        out["speedup"] = round(out["tokenizers_encode_batch_fast"]["seconds"] / out["splintr"]["seconds"], 2)
    out["mb"] = round(size / 1e6, 2)
    return out


def _run_child(function: str, *args, env: dict | None = None, progress: bool = False) -> dict:
    """``function(*args)`` in a fresh Python process; its JSON result. ``progress``: its stderr goes to ours."""
    code = f"import json, sys; from penwright.bench import {function} as f; print(json.dumps(f(*json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise PenwrightError(f"bench child {function} failed:\n{(done.stderr or '(its output is above)')[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _baseline_rss() -> float:
    """Peak RSS of a process that only imports what prepare imports (the floor under every figure)."""
    code = ("import resource, penwright.prepare, penwright.config, transformers, splintr; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip()), 1)


def generate_corpus(source_csv: Path, out_dir: Path, size_mb: int, seed: int = 0, file_mb: int = 1) -> Path:
    """~``size_mb`` MB of text: verses of the sample drawn at random (seeded) into ``file_mb`` MB files."""
    import csv

    with open(source_csv, encoding="utf-8", newline="") as f:
        verses = [row[0] for row in list(csv.reader(f))[1:]]
    rng = random.Random(seed)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    target = size_mb * 1_000_000
    written = index = 0
    while written < target:
        parts, size = [], 0
        while size < file_mb * 1_000_000:
            paragraph = " ".join(rng.choice(verses) for _ in range(rng.randint(3, 12))) + "\n\n"
            parts.append(paragraph)
            size += len(paragraph.encode("utf-8"))
        (out_dir / f"{index:05d}.txt").write_text("".join(parts), encoding="utf-8")
        written += size
        index += 1
    return out_dir


def bench_prepare(size_mb: int = 200, output: str | None = None, sample: str = "data/kjv/books") -> dict:
    sample_dir = Path(sample)
    verses = sample_dir.parent / "verses.csv"
    if not sample_dir.is_dir() or not verses.is_file():
        raise PenwrightError(f"{sample_dir}: the sample corpus is missing; run `penwright corpus` first")
    work = _fresh_dir(BENCH_DIR / "prepare")
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "goal": ">= 20 MB/s on 2 cores with the quickstart tokenizer; peak RSS flat in corpus size",
    }
    try:
        print("[bench] import floor (RSS of a process that only imports prepare's modules)", file=sys.stderr)
        results["import_rss_mb"] = _baseline_rss()

        print(f"[bench] prepare on the sample corpus ({sample_dir}, quickstart BPE trained)", file=sys.stderr)
        sample_out = work / "sample"
        results["sample"] = _run_child("_child_prepare", [f"data.path={sample_dir}", f"data.out_dir={sample_out}"])
        tokenizer = sample_out / "tokenizer"

        print("[bench] encoders side by side on the sample corpus", file=sys.stderr)
        results["encoders_on_sample"] = _run_child("_child_encoders", str(tokenizer), str(sample_dir))
        one = _run_child("_child_encoders", str(tokenizer), str(sample_dir), False, env={"RAYON_NUM_THREADS": "1"})
        results["encoders_on_sample"]["splintr_1_thread"] = one["splintr"]
        results["encoders_on_sample"]["splintr_threads_over_1_thread"] = round(
            one["splintr"]["seconds"] / results["encoders_on_sample"]["splintr"]["seconds"], 2)

        common = ["model.tokenizer.type=pretrained", f"model.tokenizer.name_or_path={tokenizer}"]
        for mb in sorted({20, size_mb}):
            print(f"[bench] generating a {mb} MB corpus", file=sys.stderr)
            corpus = generate_corpus(verses, work / f"corpus-{mb}mb", mb)
            print(f"[bench] prepare on {mb} MB (quickstart tokenizer, splintr encoder)", file=sys.stderr)
            results[f"generated_{mb}mb"] = _run_child(
                "_child_prepare", [f"data.path={corpus}", f"data.out_dir={work / f'out-{mb}'}"] + common
            )
            print(f"[bench] prepare on {mb} MB (baseline: tokenizers batch API)", file=sys.stderr)
            results[f"generated_{mb}mb_tokenizers"] = _run_child(
                "_child_prepare",
                [f"data.path={corpus}", f"data.out_dir={work / f'out-{mb}-hf'}", "data.fast_encode=false"] + common,
            )
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.rmtree(work / f"out-{mb}", ignore_errors=True)
            shutil.rmtree(work / f"out-{mb}-hf", ignore_errors=True)
        big = results[f"generated_{size_mb}mb"]
        results["summary"] = {
            f"mb_per_s_{size_mb}mb": big["mb_per_s"],
            f"speedup_vs_tokenizers_{size_mb}mb": round(
                results[f"generated_{size_mb}mb_tokenizers"]["seconds"] / big["seconds"], 2),
            "encoder_alone_mb_per_s_sample": results["encoders_on_sample"]["splintr"]["mb_per_s"],
            "encoder_threads_over_1_thread": results["encoders_on_sample"]["splintr_threads_over_1_thread"],
            "peak_rss_mb_sample_vs_20mb_vs_big": [results["sample"]["peak_rss_mb"],
                                                  results["generated_20mb"]["peak_rss_mb"], big["peak_rss_mb"]],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = atomic_write_text(output or "reports/bench_prepare.json", json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print(f"[bench] wrote {out}", file=sys.stderr)
    return results


def _steps_per_second_lightning(cfg, data, model_state, steps: int, warmup: int) -> dict:
    import lightning as L

    from penwright.model import LitGPT2, build_model

    model = build_model(cfg.model, data.meta["vocab_size"], data.meta["eos_token_id"], int(cfg.train.block_size))
    model.load_state_dict(model_state)
    module = LitGPT2(model, cfg.train, data.bytes_per_token)
    class WallClock(L.Callback):  # everything Lightning does between the first timed step and the end
        t0 = t1 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup and not self.t0:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.t1 = time.perf_counter()

    timer = WallClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=str(cfg.trainer.precision), max_steps=steps + warmup,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer], gradient_clip_val=float(cfg.train.grad_clip) or None,
                        use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    tokens = steps * data.batch_size * data.block_size
    return {"tokens_per_sec": round(tokens / (timer.t1 - timer.t0), 1), "steps": steps}


def _steps_per_second_plain(cfg, data, model_state, steps: int, warmup: int) -> dict:
    """The same model, optimizer, schedule, clipping and batches in a plain PyTorch loop."""
    import torch
    import torch.nn.functional as F

    from penwright.model import build_model, lr_lambda

    model = build_model(cfg.model, data.meta["vocab_size"], data.meta["eos_token_id"], int(cfg.train.block_size))
    model.load_state_dict(model_state)
    model.train()
    t = cfg.train
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wpe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(t.weight_decay)},
                             {"params": no_decay, "weight_decay": 0.0}], lr=float(t.lr), betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(t.warmup_steps), steps + warmup, str(t.schedule),
                                                             float(t.min_lr_ratio)))
    batches = iter(data.train_dataloader())
    tokens, start = 0, 0.0
    for step in range(steps + warmup):
        if step == warmup:  # from here on everything counts, data loading included (as for Lightning)
            start = time.perf_counter()
        batch = next(batches)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        if float(t.grad_clip):
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(t.grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += batch.shape[0] * (batch.shape[1] - 1)
    return {"tokens_per_sec": round(tokens / (time.perf_counter() - start), 1), "steps": steps}


def bench_train(steps: int = 30, rounds: int = 3, output: str | None = None, overrides: list[str] | None = None) -> dict:
    """Lightning's training step vs a plain PyTorch loop: same model, batch and data, alternating in one run."""
    import torch

    from penwright.config import compose
    from penwright.data import PreparedData
    from penwright.model import build_model

    cfg = compose(list(overrides or []))
    data = PreparedData(cfg.data.out_dir, int(cfg.train.block_size), int(cfg.train.batch_size), int(cfg.seed),
                        int(cfg.train.val_batches))
    torch.manual_seed(int(cfg.seed))
    state = build_model(cfg.model, data.meta["vocab_size"], data.meta["eos_token_id"],
                        int(cfg.train.block_size)).state_dict()
    warmup = 3
    runs: dict[str, list[float]] = {"lightning": [], "plain": []}
    for r in range(rounds):  # alternate, so drift in the machine's speed hits both alike
        for name, fn in (("plain", _steps_per_second_plain), ("lightning", _steps_per_second_lightning)):
            print(f"[bench] round {r + 1}/{rounds}: {name}, {steps} timed steps", file=sys.stderr)
            runs[name].append(fn(cfg, data, state, steps, warmup)["tokens_per_sec"])
    import statistics

    lightning, plain = max(runs["lightning"]), max(runs["plain"])
    median = {k: statistics.median(v) for k, v in runs.items()}
    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
                    "python": platform.python_version()},
        "model": {k: cfg.model.get(k) for k in ("name_or_path", "n_layer", "n_head", "n_embd")},
        "batch": {"batch_size": int(cfg.train.batch_size), "block_size": int(cfg.train.block_size)},
        "tokens_per_sec": runs,
        "best_tokens_per_sec": {"lightning": lightning, "plain": plain},
        "lightning_over_plain": round(lightning / plain, 4),
        "lightning_overhead_pct": round(100 * (1 - lightning / plain), 2),
        "median_tokens_per_sec": median,
        "lightning_overhead_pct_median": round(100 * (1 - median["lightning"] / median["plain"]), 2),
        "round_to_round_spread_pct": round(100 * max((max(v) - min(v)) / max(v) for v in runs.values()), 2),
        "goal": "Lightning overhead <= 3% of the plain loop's tokens/s",
        "measured": "wall clock from the first timed step to the end of the last, data loading included, "
                    "after 3 untimed warmup steps; best of the rounds; same init, batches, optimizer, schedule, clipping",
    }
    quick = Path(cfg.paths.reports) / "train.json"
    if quick.is_file():
        q = json.loads(quick.read_text())
        results["quickstart_from_reports_train_json"] = {k: q.get(k) for k in
                                                         ("wall_seconds", "steps", "val_bpb", "val_loss", "tokens_per_sec")}
    out = atomic_write_text(output or "reports/bench_train.json", json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("best_tokens_per_sec", "lightning_overhead_pct",
                                              "lightning_overhead_pct_median", "round_to_round_spread_pct")}, indent=2))
    print(f"[bench] wrote {out}", file=sys.stderr)
    return results


def _time_runtime(gen, ids, mask, new_tokens: int, use_cache: bool) -> dict:
    first = []
    start = time.perf_counter()
    out = gen.generate_ids(ids, mask, new_tokens, do_sample=False, stop_at_eos=False, use_cache=use_cache,
                           on_step=lambda tokens: first.append(time.perf_counter()) if not first else None)
    seconds = time.perf_counter() - start
    return {"tokens_per_sec": round(out.size / seconds, 1), "first_token_ms": round((first[0] - start) * 1000, 1),
            "seconds": round(seconds, 3)}, out


def _time_torch(model, ids, mask, new_tokens: int, eos: int) -> dict:
    import torch

    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=eos, use_cache=True)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=1, **kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)[:, ids.shape[1]:].numpy()
        seconds = time.perf_counter() - start
    return {"tokens_per_sec": round(out.size / seconds, 1), "first_token_ms": round(first * 1000, 1),
            "seconds": round(seconds, 3)}, out


def _random_124m(workdir: Path, tokenizer_dir: Path) -> Path:
    """A GPT-2-124M-shaped model (12 layers, 768 wide, vocab 50257) with random weights, exported as the
    export stage does (penwright's fused graph), plus its lean, traced and int8 variants for comparison."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from penwright.export import export_graph, quantize_int8, save_graph
    from penwright.graph import build_graph

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)).eval()
    hf_dir, onnx_dir = workdir / "gpt2-124m-random", workdir / "gpt2-124m-random-onnx"
    model.save_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # ids stay below 50257: any GPT-2-style tokenizer serves
    tok.save_pretrained(hf_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    save_graph(build_graph(model, "fused"), onnx_dir / "model.onnx")
    save_graph(build_graph(model, "lean"), onnx_dir / LEAN)
    export_graph(model, onnx_dir / TRACED, 17)
    quantize_int8(onnx_dir / "model.onnx", onnx_dir / "model.int8.onnx")
    tok.save_pretrained(onnx_dir)
    model.config.save_pretrained(onnx_dir)
    return hf_dir


def _quickstart_variants(onnx_dir: Path, hf_dir: Path, workdir: Path) -> Path:
    """A copy of the quickstart's ONNX folder with the lean, traced and int8 graphs beside the exported one."""
    from transformers import GPT2LMHeadModel

    from penwright.export import export_graph, quantize_int8, save_graph
    from penwright.graph import build_graph

    copy = workdir / "quickstart-onnx"
    shutil.copytree(onnx_dir, copy)
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    save_graph(build_graph(model, "lean"), copy / LEAN)
    export_graph(model, copy / TRACED, 17)
    if not (copy / "model.int8.onnx").is_file():
        quantize_int8(copy / "model.onnx", copy / "model.int8.onnx")
    return copy


def _weights_floor(model, rounds: int = 5) -> dict:
    """The least time this machine takes for the matrix-vector products of one batch-1 decoding step
    in fp32, and nothing else: ``x @ W`` over every weight matrix of the model in turn (attention,
    MLP, the output projection read whole; the embeddings give one row each, so they are left out),
    best of ``rounds``, the faster of numpy and PyTorch. These read every weight once (~4 bytes per
    parameter), so memory bandwidth bounds them; no fp32 engine decodes a token at batch 1 faster."""
    import torch

    mats = [p.detach().float() for n, p in model.named_parameters()
            if p.dim() == 2 and not n.endswith(("wte.weight", "wpe.weight")) and not n.startswith("lm_head")]
    mats.append(model.lm_head.weight.detach().float().t().contiguous())  # [embd, vocab] like the graph's, once
    arrays = [m.numpy() for m in mats]
    inputs = [np.ones((1, a.shape[0]), np.float32) for a in arrays]
    size = sum(a.nbytes for a in arrays)

    def numpy_chain():
        for x, w in zip(inputs, arrays):
            x @ w

    def torch_chain():
        with torch.no_grad():
            for x, w in zip(inputs, mats):
                torch.from_numpy(x) @ w

    best = {}
    for name, chain in (("numpy", numpy_chain), ("torch", torch_chain)):
        chain()  # warm
        best[name] = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            chain()
            best[name] = min(best[name], time.perf_counter() - start)
    fastest = min(best.values())
    return {"weights_mb": round(size / 1e6, 1), "matrices": len(arrays),
            "read_gb_per_s": round(size / fastest / 1e9, 1), "ms_per_token": round(fastest * 1000, 2),
            "ms_per_token_numpy": round(best["numpy"] * 1000, 2), "ms_per_token_torch": round(best["torch"] * 1000, 2)}


TRACED = "model.traced.onnx"
LEAN = "model.lean.onnx"
ROUNDS = 5


def _interleaved(engines: dict, rounds: int = ROUNDS) -> dict:
    """Each engine ``rounds`` times, in turn (a, b, c, a, b, c, ...): the run with the median tokens/s of each.

    Interleaving keeps a machine that speeds up or slows down during the benchmark from favouring one engine.
    """
    runs: dict = {k: [] for k in engines}
    for _ in range(rounds):
        for key, run in engines.items():
            runs[key].append(run())
    return {k: sorted(v, key=lambda r: r[0]["tokens_per_sec"])[len(v) // 2] for k, v in runs.items()}


# -- against llama.cpp ---------------------------------------------------------------------------------

LLAMA_CPP = Path(".llama.cpp") / "bin"  # where scripts/build_llama_cpp.sh puts llama.cpp's tools
LLAMA_TOOLS = ("llama-bench", "llama-batched-bench")
PRECISIONS = (("fp32", "model.onnx", "f32"), ("8-bit", "model.q8.onnx", "q8_0"), ("4-bit", "model.q4.onnx", "q4_0"))


def llama_tools(path: str | Path) -> dict[str, Path]:
    """llama.cpp's benchmark binaries in ``path``, or a PenwrightError that says how to get them."""
    tools = {t: Path(path) / t for t in LLAMA_TOOLS}
    missing = [t for t, p in tools.items() if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        raise PenwrightError(f"{path}: llama.cpp's {', '.join(missing)} not found. Build them with "
                             "`scripts/build_llama_cpp.sh` (about 10 min on 2 cores), point --llama-cpp at a llama.cpp "
                             "build's bin/ folder, or leave llama.cpp out with --without-llama-cpp")
    return tools


def _run_tool(args: list) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise PenwrightError(f"{Path(args[0]).name} failed (exit {done.returncode}) on {args[2]}: {tail}")
    return done.stdout


def _llama_tg(tools: dict, gguf: Path, n: int, threads: int) -> dict:
    """llama-bench's decoding test: ``n`` tokens one at a time from an empty context (one repetition)."""
    rows = json.loads(_run_tool([tools["llama-bench"], "-m", gguf, "-p", 0, "-n", n, "-t", threads, "-r", 1, "-o", "json"]))
    return {"tokens_per_sec": round(float(rows[0]["avg_ts"]), 1)}


def _llama_batched(tools: dict, gguf: Path, prompt: int, n: int, batches: list[int], threads: int) -> dict:
    """llama-batched-bench: ``batch`` sequences of ``prompt`` tokens decoding ``n`` tokens together: decode tokens/s."""
    out = _run_tool([tools["llama-batched-bench"], "-m", gguf, "-c", max(batches) * (prompt + n), "-b", 2048,
                     "-ub", 512, "-npp", prompt, "-ntg", n, "-npl", ",".join(map(str, batches)), "-t", threads,
                     "--output-format", "jsonl"])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {int(r["pl"]): round(float(r["speed_tg"]), 1) for r in rows}


def _time_engine(engine, prompt: list[int], batch: int, n: int) -> tuple[dict, np.ndarray]:
    """penwright's serving engine (GroupQueryAttention over a preallocated cache): ``batch`` greedy rows of ``n`` tokens."""
    from penwright.engine import Request
    from penwright.sampling import SamplingConfig

    requests = [Request(list(prompt), n, SamplingConfig(do_sample=False), min_tokens=n) for _ in range(batch)]
    start = time.perf_counter()
    for r in requests:
        engine.submit(r)
    while engine.step() or not engine.waiting.empty():
        pass
    seconds = time.perf_counter() - start
    out = np.array([r.tokens for r in requests])
    return {"tokens_per_sec": round(out.size / seconds, 1), "seconds": round(seconds, 3)}, out


def _llama_top1(gguf: Path, ids: np.ndarray) -> np.ndarray:
    """llama.cpp's top-1 next token at every position of each window (one prefill a window)."""
    from penwright.llamacpp import load_llama

    llm = load_llama(gguf, repack=False, n_ctx=ids.shape[1] + 1, n_batch=ids.shape[1] + 1, logits_all=True, n_threads=2)
    top1 = []
    for row in ids:
        llm.reset()
        llm.eval(row.tolist())
        top1.append(np.asarray(llm.scores[: len(row)]).argmax(-1))
    return np.stack(top1)


def _child_llama_cpp(tools_dir: str, name: str, hf_dir: str, onnx_dir: str, prepared: str, block: int) -> dict:
    """Run in a subprocess (one per model): penwright starts as fresh as llama.cpp's own processes."""
    return _llama_cpp_cases(llama_tools(tools_dir), {name: (Path(hf_dir), Path(onnx_dir))}, Path(prepared), block)


def _llama_cpp_cases(tools: dict, models: dict, prepared: Path, block: int, new_tokens: int = 200,
                     batched_tokens: int = 128, rounds: int = ROUNDS) -> dict:
    """penwright against llama.cpp on the same weights (GGUF written by export.gguf): batch 1 at each precision,
    batched decoding (fp32), and each quantization's top-1 agreement with fp32 on validation windows."""
    from transformers import GPT2LMHeadModel

    from penwright.engine import Engine
    from penwright.export import graph_logits, quantize, validation_windows
    from penwright.llamacpp import export_gguf

    threads = os.cpu_count() or 1
    results: dict = {"threads": threads, "new_tokens": new_tokens, "llama_cpp": str(tools["llama-bench"].parent),
                     "measured": "batch 1: greedy decoding of new_tokens from a one-token prompt; llama.cpp: llama-bench "
                                 "-p 0 -n new_tokens (decode only, its own timer); penwright: its serving engine, wall time of the "
                                 f"whole loop (sampling and detokenization included); {rounds} interleaved rounds, "
                                 "medians; batched: llama-batched-bench decode tokens/s against penwright's wall time"}
    for name, (hf_dir, onnx_dir) in models.items():
        model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
        for _, graph, _ in PRECISIONS[1:]:
            if not (onnx_dir / graph).is_file():
                quantize(onnx_dir / "model.onnx", graph.split(".")[1])
        ggufs = {g["type"]: onnx_dir / g["file"] for g in export_gguf(model, hf_dir, onnx_dir, [t for *_, t in PRECISIONS])}
        eos = int(model.config.eos_token_id if model.config.eos_token_id is not None else 0)
        n = min(new_tokens, model.config.n_positions - 1)
        for precision, graph, qtype in PRECISIONS:
            # penwright's serving engine (what generate and serve run), alone in this process: a second onnxruntime
            # session run right before it was measured to cost it ~15% (its worker threads keep the cores busy)
            engine = Engine.load(onnx_dir, slots=1, graph=graph)
            engines = {"penwright": lambda: _time_engine(engine, [eos], 1, n),
                       "llama_cpp": lambda: (_llama_tg(tools, ggufs[qtype], n, threads), None)}
            print(f"[bench] {name} batch 1 {precision}: penwright vs llama.cpp {qtype}, {n} tokens, {rounds} rounds",
                  file=sys.stderr)
            timed = _interleaved(engines, rounds)
            results[f"{name}/batch1/{precision}"] = {
                "penwright": timed["penwright"][0], f"llama_cpp_{qtype}": timed["llama_cpp"][0],
                "penwright_over_llama_cpp": round(timed["penwright"][0]["tokens_per_sec"]
                                                  / timed["llama_cpp"][0]["tokens_per_sec"], 2),
                "gguf_mb": round(ggufs[qtype].stat().st_size / 1e6, 2),
                "onnx_mb": round((onnx_dir / graph).stat().st_size / 1e6, 2),
            }
            del engine, engines
        if name == "quickstart":  # a trained model: how close each quantization stays to fp32
            batch = validation_windows(prepared, min(block, model.config.n_positions - 1), windows=8)
            ids_w = batch[:, :-1]
            fp32 = graph_logits(onnx_dir, "model.onnx", ids_w).argmax(-1)
            llama_f32 = _llama_top1(ggufs["f32"], ids_w)
            agree = {"tokens": int(ids_w.size), "llama_cpp_f32_vs_penwright_fp32": round(float((llama_f32 == fp32).mean()), 4)}
            for precision, graph, qtype in PRECISIONS[1:]:
                agree[f"penwright_{graph.split('.')[1]}"] = round(float((graph_logits(onnx_dir, graph, ids_w).argmax(-1) == fp32).mean()), 4)
                agree[f"llama_cpp_{qtype}"] = round(float((_llama_top1(ggufs[qtype], ids_w) == fp32).mean()), 4)
            results[f"{name}/top1_agreement_with_fp32"] = agree
        else:  # batched decoding, fp32
            prompt = [eos] * 8
            for batch in (8, 32):
                engine = Engine.load(onnx_dir, slots=batch)
                engines = {"penwright": lambda: _time_engine(engine, prompt, batch, batched_tokens),
                           "llama_cpp": lambda: ({"tokens_per_sec": _llama_batched(
                               tools, ggufs["f32"], len(prompt), batched_tokens, [batch], threads)[batch]}, None)}
                print(f"[bench] {name} batch {batch} fp32: {batched_tokens} tokens, 3 rounds", file=sys.stderr)
                timed = _interleaved(engines, 3)
                results[f"{name}/batch{batch}/fp32"] = {
                    "penwright": timed["penwright"][0],
                    "llama_cpp_f32_decode_tokens_per_sec": timed["llama_cpp"][0]["tokens_per_sec"],
                    "penwright_over_llama_cpp": round(timed["penwright"][0]["tokens_per_sec"]
                                                      / timed["llama_cpp"][0]["tokens_per_sec"], 2)}
                del engine, engines
            floor = _weights_floor(model)
            b1 = results[f"{name}/batch1/fp32"]
            ms = {k: round(1000 / b1[k]["tokens_per_sec"], 2) for k in ("penwright", "llama_cpp_f32")}
            results["memory_floor_124m_fp32"] = {**floor, "ms_per_token": ms,
                                                 "floor_over_engine": {k: round(floor["ms_per_token"] / v, 2) for k, v in ms.items()}}
    return results


def bench_generate(output: str | None = None, quick_dir: str = "artifacts/model", quick_onnx: str = "artifacts/onnx",
                   new_tokens: int = 256, long_tokens: int = 512, llama_cpp: str | None = str(LLAMA_CPP),
                   prepared: str = "artifacts/prepared", only_llama_cpp: bool = False) -> dict:
    """This runtime vs transformers generate (PyTorch, cached) vs this runtime re-feeding, side by side; then
    penwright vs llama.cpp (its binaries in ``llama_cpp``; None leaves it out) at each precision.
    ``only_llama_cpp``: only the llama.cpp comparison, replacing that section of the existing report."""
    import torch
    from transformers import GPT2LMHeadModel

    from penwright.runtime import Generator

    tools = llama_tools(llama_cpp) if llama_cpp else None  # before any work: say now if llama.cpp is missing
    if only_llama_cpp and not tools:
        raise PenwrightError("--only-llama-cpp needs llama.cpp's tools: drop --without-llama-cpp")
    if not (Path(quick_onnx) / "model.onnx").is_file():
        raise PenwrightError(f"{quick_onnx}/model.onnx: missing; run `dvc repro` (or penwright train + export) first")
    work = _fresh_dir(BENCH_DIR / "generate")
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "measured": "greedy decoding, no early stop, same prompt and number of new tokens for every engine; "
                    "tokens/s = new tokens (all rows) / wall seconds; first token = prefill + first choice; "
                    f"cached engines: median of {ROUNDS} interleaved rounds; no-cache: one run",
        "goals": "(a)/(b) >= 4x quickstart batch 1; >= 2x gpt2-124M-shape batch 1 and 8; (a)/(c) >= 8x at 512 tokens",
        "cases": {},
    }
    try:
        big_hf = _random_124m(work, Path(quick_onnx))
        quick = _quickstart_variants(Path(quick_onnx), Path(quick_dir), work)
        models = {"quickstart": (Path(quick_dir), quick), "gpt2-124m-shape": (big_hf, work / "gpt2-124m-random-onnx")}
        if only_llama_cpp:  # the rest of the report stays as it was
            previous = Path(output or "reports/bench_generate.json")
            results = json.loads(previous.read_text()) if previous.is_file() else results
        for name, (hf_dir, onnx_dir) in ({} if only_llama_cpp else models).items():
            gen = Generator.load(onnx_dir)
            traced = Generator.load(onnx_dir, graph=TRACED)
            lean = Generator.load(onnx_dir, graph=LEAN)
            int8 = Generator.load(onnx_dir, graph="model.int8.onnx") if (onnx_dir / "model.int8.onnx").is_file() else None
            ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
            for batch in (1, 8):
                prompts = ["And it came to pass"] * batch
                ids, mask = gen.encode(prompts)
                n = min(new_tokens, gen.n_positions - ids.shape[1])
                engines = {"a": lambda: _time_runtime(gen, ids, mask, n, use_cache=True),
                           "b": lambda: _time_torch(ref, ids, mask, n, gen.eos),
                           "l": lambda: _time_runtime(lean, ids, mask, n, use_cache=True),
                           "t": lambda: _time_runtime(traced, ids, mask, n, use_cache=True)}
                if int8 is not None:
                    engines["q"] = lambda: _time_runtime(int8, ids, mask, n, use_cache=True)
                print(f"[bench] {name} batch {batch}: {n} new tokens x {len(engines) + 1} engines, cached ones "
                      f"{ROUNDS} rounds interleaved", file=sys.stderr)
                timed = _interleaved(engines)
                (a, a_ids), (b, b_ids), (t, t_ids), (lg, l_ids) = timed["a"], timed["b"], timed["t"], timed["l"]
                c, _ = _time_runtime(gen, ids, mask, n, use_cache=False)  # slow: once
                case = {
                    "new_tokens": n, "runtime": a, "transformers_generate": b, "runtime_no_cache": c,
                    "runtime_lean_graph": lg, "runtime_traced_graph": t,
                    "runtime_over_transformers": round(a["tokens_per_sec"] / b["tokens_per_sec"], 2),
                    "runtime_over_no_cache": round(a["tokens_per_sec"] / c["tokens_per_sec"], 2),
                    "graph_over_lean_graph": round(a["tokens_per_sec"] / lg["tokens_per_sec"], 2),
                    "graph_over_traced_graph": round(a["tokens_per_sec"] / t["tokens_per_sec"], 2),
                    "same_tokens_as_transformers": bool(np.array_equal(a_ids, b_ids)),
                    "lean_graph_same_tokens": bool(np.array_equal(l_ids, b_ids)),
                    "traced_graph_same_tokens": bool(np.array_equal(t_ids, b_ids)),
                    "provider": gen.provider,
                }
                if int8 is not None:  # another precision: faster, not the same tokens (see its agreement)
                    q, q_ids = timed["q"]
                    case["runtime_int8"] = q
                    case["runtime_int8_over_transformers"] = round(q["tokens_per_sec"] / b["tokens_per_sec"], 2)
                    case["int8_tokens_agreeing_with_fp32"] = round(float((q_ids == a_ids).mean()), 3)
                results["cases"][f"{name}/batch{batch}"] = case
            if name == "gpt2-124m-shape":  # batch 1 streams every weight once per token: memory bounds it
                floor = _weights_floor(ref)
                b1 = results["cases"][f"{name}/batch1"]
                torch_ms = 1000 / b1["transformers_generate"]["tokens_per_sec"]
                results["memory_floor"] = {
                    "model": name, **floor, "transformers_ms_per_token_batch1": round(torch_ms, 2),
                    "runtime_ms_per_token_batch1": round(1000 / b1["runtime"]["tokens_per_sec"], 2),
                    "most_runtime_over_transformers_fp32_batch1": round(torch_ms / floor["ms_per_token"], 2),
                }
        if not only_llama_cpp:
            gen = Generator.load(work / "gpt2-124m-random-onnx")
            ids, mask = gen.encode(["And it came to pass"])
            n = long_tokens - ids.shape[1]
            print(f"[bench] gpt2-124m-shape batch 1: {n} new tokens, cache vs re-feeding", file=sys.stderr)
            a, _ = _time_runtime(gen, ids, mask, n, use_cache=True)
            c, _ = _time_runtime(gen, ids, mask, n, use_cache=False)
            results["cases"][f"gpt2-124m-shape/batch1/{long_tokens}-tokens"] = {
                "new_tokens": n, "runtime": a, "runtime_no_cache": c,
                "runtime_over_no_cache": round(a["tokens_per_sec"] / c["tokens_per_sec"], 2),
            }
            del gen
        if tools:  # each model in a fresh process: none of the sessions above (or their threads) is alive there
            results["llama_cpp"] = {}
            for name, (hf_dir, onnx_dir) in models.items():
                results["llama_cpp"].update(_run_child("_child_llama_cpp", str(llama_cpp), name, str(hf_dir),
                                                       str(onnx_dir), prepared, 256, progress=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = atomic_write_text(output or "reports/bench_generate.json", json.dumps(results, indent=2) + "\n")
    summary = {k: {m: v[m] for m in ("runtime_over_transformers", "runtime_over_no_cache", "graph_over_lean_graph",
                                     "graph_over_traced_graph",
                                     "runtime_int8_over_transformers") if m in v}
               for k, v in results["cases"].items()}
    if "llama_cpp" in results:
        summary["llama_cpp"] = {k: v["penwright_over_llama_cpp"] for k, v in results["llama_cpp"].items()
                                if isinstance(v, dict) and "penwright_over_llama_cpp" in v}
        summary["top1_agreement_with_fp32"] = results["llama_cpp"].get("quickstart/top1_agreement_with_fp32")
    print(json.dumps({**summary, "memory_floor": results.get("memory_floor")}, indent=2))
    print(f"[bench] wrote {out}", file=sys.stderr)
    return results
