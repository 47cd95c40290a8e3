"""``penwright bench <stage>``: measure a stage side by side with its baseline, write reports/bench_<stage>.json.

Each measured run happens in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own.

prepare:
* encoder throughput on the sample corpus: the fast tokenizer's batch API (baseline) vs the
  tiktoken encoder prepare uses when it gives identical ids;
* the whole stage on the sample corpus (quickstart config: BPE training included), and on
  generated corpora of ~20 MB and ``--size-mb`` MB (verses of the sample drawn at random into 1 MB
  files), tokenized with the quickstart tokenizer: MB/s and peak RSS for each, to show RSS stays
  flat as the corpus grows.
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

from penwright.errors import PenwrightError

BENCH_DIR = Path("artifacts") / "bench"


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


def _child_encoders(tokenizer_dir: str, corpus: str) -> dict:
    """Run in a subprocess: both encoders on the same texts, best of 3 each, ids compared."""
    from transformers import AutoTokenizer

    from penwright.tokenizer import fast_encoder

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(corpus).glob("*.txt"))]
    size = sum(len(t.encode("utf-8")) for t in texts)
    backend = tok.backend_tokenizer
    encoders = {
        "tokenizers_encode_batch_fast": lambda ts: [e.ids for e in backend.encode_batch_fast(ts, add_special_tokens=False)],
        "tiktoken": fast_encoder(tok),
    }
    out, ids = {}, {}
    for name, encode in encoders.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            ids[name] = encode(texts)
            best = min(best, time.perf_counter() - start)
        out[name] = {"seconds": round(best, 3), "mb_per_s": round(size / 1e6 / best, 2)}
    out["identical_ids"] = [a.tolist() for a in ids["tiktoken"]] == ids["tokenizers_encode_batch_fast"]
    out["speedup"] = round(out["tokenizers_encode_batch_fast"]["seconds"] / out["tiktoken"]["seconds"], 2)
    out["mb"] = round(size / 1e6, 2)
    return out


def _run_child(function: str, *args) -> dict:
    code = f"import json, sys; from penwright.bench import {function} as f; print(json.dumps(f(*json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True)
    if done.returncode != 0:
        raise PenwrightError(f"bench child {function} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _baseline_rss() -> float:
    """Peak RSS of a process that only imports what prepare imports (the floor under every figure)."""
    code = ("import resource, penwright.prepare, penwright.config, transformers, tiktoken; "
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
    work = BENCH_DIR / "prepare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "goal": ">= 20 MB/s on 2 cores with the quickstart tokenizer; peak RSS flat in corpus size",
    }
    try:
        print(f"[bench] import floor (RSS of a process that only imports prepare's modules)", file=sys.stderr)
        results["import_rss_mb"] = _baseline_rss()

        print(f"[bench] prepare on the sample corpus ({sample_dir}, quickstart BPE trained)", file=sys.stderr)
        sample_out = work / "sample"
        results["sample"] = _run_child("_child_prepare", [f"data.path={sample_dir}", f"data.out_dir={sample_out}"])
        tokenizer = sample_out / "tokenizer"

        print("[bench] encoders side by side on the sample corpus", file=sys.stderr)
        results["encoders_on_sample"] = _run_child("_child_encoders", str(tokenizer), str(sample_dir))

        common = ["model.tokenizer.type=pretrained", f"model.tokenizer.name_or_path={tokenizer}"]
        for mb in sorted({20, size_mb}):
            print(f"[bench] generating a {mb} MB corpus", file=sys.stderr)
            corpus = generate_corpus(verses, work / f"corpus-{mb}mb", mb)
            print(f"[bench] prepare on {mb} MB (quickstart tokenizer, tiktoken encoder)", file=sys.stderr)
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
            "peak_rss_mb_sample_vs_20mb_vs_big": [results["sample"]["peak_rss_mb"],
                                                  results["generated_20mb"]["peak_rss_mb"], big["peak_rss_mb"]],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(output or "reports/bench_prepare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(results["summary"], indent=2))
    print(f"[bench] wrote {out}", file=sys.stderr)
    return results
