"""``python -m benchmarks step [key=value ...]``: one CPU training step, three ways -> bench_step.json.

The step is the train stage's math without Lightning (forward, next-token cross-entropy, backward, gradient
clipping, AdamW) on the configured model, batch and block, with random tokens. It runs three ways:

* ``gelu_new``: GPT-2's GELU as five PyTorch ops, the allocator as glibc sets it (penwright before
  ``model.activation`` and ``train.keep_freed_memory``);
* ``fused gelu``: ``model.activation=gelu_pytorch_tanh``, the same function as one op;
* ``fused gelu, kept memory``: and ``train.keep_freed_memory=true``.

Each measurement is a fresh process (the allocator's settings hold for a whole process), the three in turns,
round after round; the report gives each way's median step over the rounds and its ratio to the first.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

from benchmarks.common import in_fresh_process, log, write_report

WAYS = {
    "gelu_new": ["model.activation=gelu_new", "train.keep_freed_memory=false"],
    "fused gelu": ["model.activation=gelu_pytorch_tanh", "train.keep_freed_memory=false"],
    "fused gelu, kept memory": ["model.activation=gelu_pytorch_tanh", "train.keep_freed_memory=true"],
}
VOCAB = 4096  # the quickstart's BPE


def median_step_ms(overrides: list[str], steps: int, warmup: int = 5) -> tuple[float, bool]:
    """The median wall time of ``steps`` training steps (after ``warmup`` untimed ones), in this process, and
    whether freed memory was kept (``train.keep_freed_memory`` asked for and glibc took it)."""
    import torch
    import torch.nn.functional as F

    from penwright.core.config import compose
    from penwright.train.model import build_model
    from penwright.train.stage import keep_freed_memory

    cfg = compose(overrides)
    kept = bool(cfg.train.keep_freed_memory) and keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, 0, cfg.train.block_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    batch = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.train.block_size + 1))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, kept


def bench_step(overrides: list[str], steps: int = 30, rounds: int = 3, output: str | None = None):
    from penwright.core.config import compose

    cfg = compose(list(overrides))
    shape = {
        "n_layer": cfg.model.n_layer,
        "n_embd": cfg.model.n_embd,
        "vocab_size": VOCAB,
        "batch_size": cfg.train.batch_size,
        "block_size": cfg.train.block_size,
    }
    ms: dict[str, list[float]] = {way: [] for way in WAYS}
    kept: dict[str, bool] = {}
    names = list(WAYS)
    for r in range(rounds):
        for way in names[r % len(names) :] + names[: r % len(names)]:  # each way goes first in one round
            step_ms, kept[way] = in_fresh_process(median_step_ms, [*overrides, *WAYS[way]], steps)
            ms[way].append(round(step_ms, 1))
            log(f"round {r + 1}: {way}: {ms[way][-1]} ms a step")
    first = statistics.median(ms[names[0]])
    summary = {
        way: {"step_ms_median": statistics.median(v), "vs_gelu_new": round(statistics.median(v) / first, 3)}
        for way, v in ms.items()
    }
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "shape": shape,
        "steps": steps,
        "rounds": rounds,
        "summary": summary,
        "step_ms": ms,
        "memory_kept": kept,  # False for a way that asks for it: this C library is not glibc, nothing was kept
    }
    return write_report(report, output, "benchmarks/results/bench_step.json", summary)
