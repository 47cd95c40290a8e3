"""``python -m benchmarks copies``: the copy index (``core.copy_index``) built and searched at 10 MB, 100 MB and
1 GB of text.

The corpora are the quickstart's training tokens (``artifacts/prepared/train.bin``) resampled to size: pieces
of 8 to 64 tokens from random places, end to end, until the tokens stand for the size in text at the
quickstart's own bytes per token (timing only: the copy measures themselves are checked on the real corpus).
For each size: the build's wall time and peak RSS (a child process each, ``ru_maxrss``), the index's size
on disk, and the lookup time of 1,000 windows of 256 tokens (``CopyIndex.matches``, the index in the page
cache after one untimed pass), p50 and p95. Goals: 1 GB in at most 10 minutes and 8 GiB, lookups at most
5 ms at p95.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.common import log, write_report

SIZES_MB = (10, 100, 1000)
LOOKUPS = 1000
WINDOW = 256


def resample(tokens: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` tokens made of random pieces (8 to 64 tokens) of ``tokens``."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=tokens.dtype)
    at = 0
    while at < n:
        lengths = rng.integers(8, 65, size=4096)
        starts = rng.integers(0, tokens.size - 64, size=4096)
        for start, length in zip(starts, lengths):
            take = min(int(length), n - at)
            out[at : at + take] = tokens[start : start + take]
            at += take
            if at >= n:
                break
    return out


def _build_child(folder: str, eos: int, vocab: int) -> None:
    """In a child process: build the index of ``folder/train.bin``; print its time and peak RSS as JSON."""
    from penwright.core.copy_index import build

    folder_path = Path(folder)
    tokens = np.memmap(folder_path / "train.bin", dtype=np.uint16, mode="r")
    start = time.perf_counter()
    build(folder_path, tokens, eos, vocab, max_gib=20)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"seconds": round(seconds, 1), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        )
    )


def bench_copies(prepared: str = "artifacts/prepared", sizes_mb=SIZES_MB, output: str | None = None) -> dict:
    from penwright.core.copy_index import CopyIndex

    meta = json.loads((Path(prepared) / "meta.json").read_text())
    source = np.fromfile(Path(prepared) / "train.bin", dtype=np.dtype(meta["dtype"]))
    bytes_per_token = meta["train"]["bytes"] / meta["train"]["tokens"]
    rows = []
    for mb in sizes_mb:
        n = int(mb * 1e6 / bytes_per_token)
        with tempfile.TemporaryDirectory(dir="artifacts") as tmp:
            folder = Path(tmp)
            resample(source, n).tofile(folder / "train.bin")
            log(f"{mb} MB of text: {n:,} tokens; building the index")
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"from benchmarks.copies import _build_child; _build_child({str(folder)!r}, "
                    f"{meta['eos_token_id']}, {meta['vocab_size']})",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode:
                raise SystemExit(f"building the {mb} MB index failed: {done.stderr[-2000:]}")
            built = json.loads(done.stdout.strip().splitlines()[-1])
            disk = sum(p.stat().st_size for p in (folder / "index").iterdir())
            index = CopyIndex(folder)
            windows = np.fromfile(Path(prepared) / "val.bin", dtype=np.dtype(meta["dtype"]))
            rng = np.random.default_rng(1)
            starts = rng.integers(0, windows.size - WINDOW, size=LOOKUPS)
            for s in starts[:100]:  # warm: the index's pages in the cache
                index.matches(windows[s : s + WINDOW])
            times = []
            for s in starts:
                t = time.perf_counter()
                index.matches(windows[s : s + WINDOW])
                times.append(time.perf_counter() - t)
            row = {
                "text_mb": mb,
                "tokens": n,
                "build_seconds": built["seconds"],
                "build_peak_rss_gib": round(built["peak_rss_gib"], 2),
                "index_gib_on_disk": round(disk / 2**30, 3),
                "lookup_ms_p50": round(float(np.percentile(times, 50)) * 1e3, 2),
                "lookup_ms_p95": round(float(np.percentile(times, 95)) * 1e3, 2),
            }
            log(json.dumps(row))
            rows.append(row)
    results = {
        "what": "the copy index built on the quickstart's training tokens resampled to size; lookups of 256-token "
        "val windows",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "bytes_per_token": round(bytes_per_token, 3),
        "lookups": LOOKUPS,
        "window_tokens": WINDOW,
        "sizes": rows,
        "goals": "1 GB: build <= 600 s and <= 8 GiB peak RSS; lookup p95 <= 5 ms",
    }
    write_report(results, output, "benchmarks/results/bench_copies.json", rows)
    return results
