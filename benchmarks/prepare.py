"""``python -m benchmarks prepare``: the prepare stage's throughput and peak RSS -> benchmarks/results/bench_prepare.json.

Each measured run happens in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own:

* encoder throughput on the sample corpus: the fast tokenizer's batch API (baseline) vs the
  splintr encoder prepare uses when it gives identical ids (on every core), and splintr on one
  thread (how far it scales on this machine);
* the whole stage on the sample corpus (quickstart config: BPE training included), and on
  generated corpora of ~20 MB and ``--size-mb`` MB (verses of the sample drawn at random into 1 MB
  files), tokenized with the quickstart tokenizer: MB/s and peak RSS for each, to show RSS stays
  flat as the corpus grows.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import BENCH_DIR, fresh_dir, log, run_child, write_report
from penwright.core.errors import PenwrightError

HERE = __name__  # the module the child processes import their function from


def _child_prepare(overrides: list[str]) -> dict:
    """Run in a subprocess: one prepare, timed, with the process's own peak RSS."""
    from penwright.core.config import compose
    from penwright.prepare.stage import prepare

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

    from penwright.prepare.tokenizer import fast_encoder, tokenizers_batch

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


def _baseline_rss() -> float:
    """Peak RSS of a process that only imports what prepare imports (the floor under every figure)."""
    code = (
        "import resource, penwright.prepare.stage, penwright.core.config, transformers, splintr; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip()), 1)


def generate_corpus(source_csv: Path, out_dir: Path, size_mb: float, seed: int = 0, file_mb: float = 1) -> Path:
    """~``size_mb`` MB of text: verses of the sample drawn at random (seeded) into ``file_mb`` MB files
    (one smaller file when ``size_mb`` is below ``file_mb``)."""
    import csv

    with open(source_csv, encoding="utf-8", newline="") as f:
        verses = [row[0] for row in list(csv.reader(f))[1:]]
    rng = random.Random(seed)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    target = size_mb * 1_000_000
    file_bytes = min(file_mb, size_mb) * 1_000_000
    written = index = 0
    while written < target:
        parts, size = [], 0
        while size < file_bytes:
            paragraph = " ".join(rng.choice(verses) for _ in range(rng.randint(3, 12))) + "\n\n"
            parts.append(paragraph)
            size += len(paragraph.encode("utf-8"))
        (out_dir / f"{index:05d}.txt").write_text("".join(parts), encoding="utf-8")
        written += size
        index += 1
    return out_dir


def bench_prepare(
    size_mb: float = 200,
    output: str | None = None,
    sample: str = "data/kjv/books",
    *,
    base_mb: float = 20,
    overrides: Sequence[str] = (),
    work_dir: str | Path | None = None,
    isolate: bool = True,
) -> dict:
    """The measurements above. ``base_mb``: the smaller generated corpus (20 MB; the summary's ``20mb``);
    ``overrides``: Hydra overrides for every prepare run (before the benchmark's own); ``work_dir``: scratch
    space (default artifacts/bench/prepare), removed at the end. ``isolate=False`` (tests: seconds less a run)
    runs the measured runs in this process, so their peak RSS is not their own (the one-thread encoder run
    keeps its process)."""
    sample_dir = Path(sample)
    verses = sample_dir.parent / "verses.csv"
    if not sample_dir.is_dir() or not verses.is_file():
        raise PenwrightError(f"{sample_dir}: the sample corpus is missing; run `penwright corpus` first")
    work = fresh_dir(work_dir or BENCH_DIR / "prepare")
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "goal": ">= 20 MB/s on 2 cores with the quickstart tokenizer; peak RSS flat in corpus size",
    }
    try:
        log("import floor (RSS of a process that only imports prepare's modules)")
        results["import_rss_mb"] = _baseline_rss()

        log(f"prepare on the sample corpus ({sample_dir}, quickstart BPE trained)")
        sample_out = work / "sample"
        results["sample"] = run_child(
            HERE, "_child_prepare", [*overrides, f"data.path={sample_dir}", f"data.out_dir={sample_out}"], fresh=isolate
        )
        tokenizer = sample_out / "tokenizer"

        log("encoders side by side on the sample corpus")
        results["encoders_on_sample"] = run_child(
            HERE, "_child_encoders", str(tokenizer), str(sample_dir), fresh=isolate
        )
        one = run_child(HERE, "_child_encoders", str(tokenizer), str(sample_dir), False, env={"RAYON_NUM_THREADS": "1"})
        results["encoders_on_sample"]["splintr_1_thread"] = one["splintr"]
        results["encoders_on_sample"]["splintr_threads_over_1_thread"] = round(
            one["splintr"]["seconds"] / results["encoders_on_sample"]["splintr"]["seconds"], 2
        )

        pretrained = ["model.tokenizer.type=pretrained", f"model.tokenizer.name_or_path={tokenizer}"]
        for mb in sorted({base_mb, size_mb}):
            log(f"generating a {mb} MB corpus")
            corpus = generate_corpus(verses, work / f"corpus-{mb}mb", mb)
            log(f"prepare on {mb} MB (quickstart tokenizer, splintr encoder)")
            results[f"generated_{mb}mb"] = run_child(
                HERE,
                "_child_prepare",
                [*overrides, f"data.path={corpus}", f"data.out_dir={work / f'out-{mb}'}", *pretrained],
                fresh=isolate,
            )
            log(f"prepare on {mb} MB (baseline: tokenizers batch API)")
            results[f"generated_{mb}mb_tokenizers"] = run_child(
                HERE,
                "_child_prepare",
                [
                    *overrides,
                    f"data.path={corpus}",
                    f"data.out_dir={work / f'out-{mb}-hf'}",
                    "data.fast_encode=false",
                    *pretrained,
                ],
                fresh=isolate,
            )
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.rmtree(work / f"out-{mb}", ignore_errors=True)
            shutil.rmtree(work / f"out-{mb}-hf", ignore_errors=True)
        big = results[f"generated_{size_mb}mb"]
        results["summary"] = {
            f"mb_per_s_{size_mb}mb": big["mb_per_s"],
            f"speedup_vs_tokenizers_{size_mb}mb": round(
                results[f"generated_{size_mb}mb_tokenizers"]["seconds"] / big["seconds"], 2
            ),
            "encoder_alone_mb_per_s_sample": results["encoders_on_sample"]["splintr"]["mb_per_s"],
            "encoder_threads_over_1_thread": results["encoders_on_sample"]["splintr_threads_over_1_thread"],
            "peak_rss_mb_sample_vs_20mb_vs_big": [
                results["sample"]["peak_rss_mb"],
                results[f"generated_{base_mb}mb"]["peak_rss_mb"],
                big["peak_rss_mb"],
            ],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(results, output, "benchmarks/results/bench_prepare.json", results["summary"])
    return results
