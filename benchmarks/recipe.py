"""``python -m benchmarks recipe [key=value ...]``: the quickstart's recipe scored on text it never saw -> bench_recipe.json.

The evaluation the recipe sweep is judged by, committed so anyone can rerun it:

* the sample corpus's text, its books in order, as one file (``artifacts/recipe/kjv.txt``);
* prepared as the quickstart prepares it, with ``data.val_fraction=0.1``: one document splits by tokens, so the
  model trains on the first 90% and the last 10% is held out (the tokenizer, too, is trained on the first 90% only);
* trained with the recipe (the quickstart's defaults, plus the overrides given), with ``logger=none``;
* scored in bits per byte over the whole held-out 10%: every token after the first, each predicted from the
  window of up to ``train.block_size`` tokens before it in its block, summed in nats, over the UTF-8 bytes those
  tokens decode to.

With overrides, the default recipe and the given one run in turns (``--runs`` each, each run in a fresh
process), so their wall times come from the same minutes of the same machine; train.json's ``wall_seconds`` is
the time the sweep's constraint is about.
The fixed reference is nanoGPT's CPU recipe given the same training wall time (1.975 bits per byte, measured
once; nanoGPT is not run here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import fresh_dir, in_fresh_process, log, write_report

WORK = Path("artifacts/recipe")
NANOGPT_BPB = 1.975  # nanoGPT's CPU recipe (char-level, 4x4x128, block 64, batch 12) at the same training wall time
GOAL_BPB = 1.68  # 15% below it


def corpus_in_order(books: Path, out: Path) -> Path:
    """The sample corpus's books, in order (their file names are numbered), as one file."""
    files = sorted(books.glob("*.txt"))
    if not files:
        from penwright.core.errors import PenwrightError

        raise PenwrightError(f"{books}: no books; write the sample corpus first with `penwright corpus`")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f.read_text() for f in files)
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return out


def held_out_bpb(model_dir: Path, prepared: Path, block_size: int) -> dict:
    """Bits per byte of the trained model over every held-out token (see the module's docstring)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from penwright.train.data import load_tokens

    tokens = np.asarray(load_tokens(prepared, "val"), dtype=np.int64)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    nats, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(tokens) - 1, block_size):
            window = torch.from_numpy(tokens[start : start + block_size + 1])[None]
            logits = model(window[:, :-1]).logits.float()
            nats += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    scored = len(tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
    return {"bpb": round(nats / math.log(2) / scored, 5), "tokens": count, "bytes": scored}


def one_run(overrides: list[str], name: str) -> dict:
    """Prepare (when its output is not there for this recipe's tokenizer), train and score one recipe."""
    from penwright.core.config import compose
    from penwright.prepare.stage import prepare
    from penwright.train.stage import train

    corpus = corpus_in_order(Path("data/kjv/books"), WORK / "kjv.txt")
    base = [
        f"data.path={corpus}",
        "data.val_fraction=0.1",
        "data.copy_index=false",
        "logger=none",
        "train.resume=false",
    ]
    probe = compose([*base, *overrides])
    tokenizer_key = json.dumps(probe.model.tokenizer.to_dict(), sort_keys=True)
    prepared = WORK / f"prepared-{hashlib.md5(tokenizer_key.encode()).hexdigest()[:8]}"  # one per tokenizer
    paths = [
        f"data.out_dir={prepared}",
        f"train.ckpt_dir={WORK / name / 'ckpt'}",
        f"train.out_dir={WORK / name / 'model'}",
        f"paths.reports={WORK / name / 'reports'}",
    ]
    cfg = compose([*base, *paths, *overrides])
    if not (prepared / "meta.json").is_file():
        prepare(cfg)
    fresh_dir(WORK / name)
    metrics = train(cfg)
    scored = held_out_bpb(WORK / name / "model", prepared, cfg.train.block_size)
    log(f"{name}: {scored['bpb']} bits per byte held out, {metrics['wall_seconds']} s")
    return {"wall_seconds": metrics["wall_seconds"], "steps": metrics["steps"], **scored}


def bench_recipe(overrides: list[str], runs: int = 1, output: str | None = None) -> Path:
    import platform

    recipes = {"default": []} | ({"candidate": list(overrides)} if overrides else {})
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    started = time.time()
    for k in range(runs):
        for name, extra in recipes.items():  # in turns: both see the same minutes of the machine
            results[name].append(in_fresh_process(one_run, extra, f"{name}-{k}"))
    summary = {}
    for name, rows in results.items():
        summary[name] = {
            "overrides": recipes[name],
            "held_out_bpb": statistics.median(r["bpb"] for r in rows),
            "wall_seconds_median": statistics.median(r["wall_seconds"] for r in rows),
            "vs_nanogpt": round(statistics.median(r["bpb"] for r in rows) / NANOGPT_BPB, 4),
        }
    if overrides:
        summary["candidate"]["wall_vs_default"] = round(
            summary["candidate"]["wall_seconds_median"] / summary["default"]["wall_seconds_median"], 3
        )
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "nanogpt_reference_bpb": NANOGPT_BPB,
        "goal_bpb": GOAL_BPB,
        "runs": runs,
        "summary": summary,
        "rows": results,
    }
    return write_report(report, output, "benchmarks/results/bench_recipe.json", summary)
