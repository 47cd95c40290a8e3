"""What the benchmarks share: scratch folders, fresh child processes, interleaved timing, the random
GPT-2-124M-shaped model (the GPT-2 check's), waiting for a server, and writing a report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from penwright.core.atomic import atomic_write_text
from penwright.core.errors import PenwrightError
from penwright.core.log import get_logger
from penwright.export.save import save_fused  # noqa: F401 (the benchmarks' folders are written as the export writes them)
from penwright.gpu_check import SHAPE_124M, random_gpt2  # noqa: F401 (the GPU check's random GPT-2, shared)

BENCH_DIR = Path("artifacts") / "bench"  # scratch space (each benchmark removes what it made)
ROUNDS = 5  # interleaved rounds of the timed engines: the run with the median tokens/s counts


log = get_logger("bench").info


def fresh_dir(path: str | Path) -> Path:
    """An empty scratch directory for one benchmark (removed again when it ends)."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def require_export(onnx_dir: str | Path) -> Path:
    """The exported folder, or a PenwrightError saying how to make it."""
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "model.onnx").is_file():
        raise PenwrightError(f"{onnx_dir}/model.onnx: missing; run `dvc repro` (or penwright train + export) first")
    return onnx_dir


def run_child(
    module: str, function: str, *args, env: dict | None = None, progress: bool = False, fresh: bool = True
) -> dict:
    """``module.function(*args)`` in a fresh Python process (its peak RSS and threads are its own); its JSON
    result. ``progress``: its stderr goes to ours. ``fresh=False`` (tests): in this process instead, arguments
    and result through JSON all the same; a call with ``env`` still gets its own process (only a new process
    starts with that environment)."""
    if not fresh and not env:
        from importlib import import_module

        f = getattr(import_module(module), function)
        return json.loads(json.dumps(f(*json.loads(json.dumps(list(args))))))
    code = f"import json, sys; from {module} import {function} as f; print(json.dumps(f(*json.loads(sys.argv[1]))))"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        stdout=subprocess.PIPE,
        stderr=None if progress else subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise PenwrightError(f"bench child {function} failed:\n{(done.stderr or '(its output is above)')[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(engines: dict, rounds: int = ROUNDS, per_round: dict | None = None) -> dict:
    """Each engine ``rounds`` times, in turn (a, b, c, a, b, c, ...): the run with the median tokens/s of each.

    Each engine returns ``(timing, output)`` with ``timing["tokens_per_sec"]``. Interleaving keeps a machine
    that speeds up or slows down during the benchmark from favouring one engine. ``per_round``: filled with
    each engine's tokens/s in every round, in order.
    """
    runs: dict = {k: [] for k in engines}
    for _ in range(rounds):
        for key, run in engines.items():
            runs[key].append(run())
    if per_round is not None:
        per_round.update({k: [r[0]["tokens_per_sec"] for r in v] for k, v in runs.items()})
    return {k: sorted(v, key=lambda r: r[0]["tokens_per_sec"])[len(v) // 2] for k, v in runs.items()}


def wait_until_healthy(url: str, seconds: float, process=None) -> None:
    """Poll ``url``/health until it answers 200; raise (saying why) after ``seconds`` or if ``process`` exits."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise PenwrightError(f"the server at {url} exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise PenwrightError(f"the server at {url} did not become healthy in {seconds:g} s")


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a fresh interpreter (spawned): what one measurement leaves in its process (imports done,
    the allocator's settings of ``train.keep_freed_memory``) cannot speed up or slow down the next."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def with_earlier_models(models: dict, output: str | Path | None, default: str) -> dict:
    """``models`` (a report's name -> entry) after the models measured before in the report at ``output`` (else
    ``default``): a model not rerun keeps its last measurement (each entry has its date), a rerun one is replaced."""
    earlier = Path(output or default)
    return {**json.loads(earlier.read_text()).get("models", {}), **models} if earlier.is_file() else models


def write_report(results: dict, output: str | Path | None, default: str, summary) -> Path:
    """``results`` as JSON at ``output`` (else ``default``, e.g. benchmarks/results/bench_train.json); ``summary`` on stdout."""
    out = atomic_write_text(output or default, json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    log(f"wrote {out}")
    return out
