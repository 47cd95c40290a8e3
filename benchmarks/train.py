"""``python -m benchmarks train``: Lightning's training step against a plain PyTorch loop -> benchmarks/results/bench_train.json.

The same model (one init), batches, optimizer, schedule and clipping in both: the plain loop takes
the optimizer, the schedule and the loss from the train stage's own ``LitGPT2``, and runs them
without a Trainer. The two alternate, round after round, in one process.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from benchmarks.common import log, write_report

WARMUP = 3  # untimed steps before each timed run


def _model(cfg, data, state: dict):
    """The benchmarked model, built as the train stage builds it, with the shared initial weights."""
    from penwright.train.model import build_model

    model = build_model(cfg.model, data.meta["vocab_size"], data.meta["eos_token_id"], int(cfg.train.block_size))
    if state is not None:
        model.load_state_dict(state)
    return model


def _steps_per_second_lightning(cfg, data, model_state, steps: int, warmup: int) -> dict:
    import lightning as L

    from penwright.train.model import LitGPT2

    module = LitGPT2(_model(cfg, data, model_state), cfg.train, data.bytes_per_token)

    class WallClock(L.Callback):  # everything Lightning does between the first timed step and the end
        t0 = t1 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup and not self.t0:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.t1 = time.perf_counter()

    timer = WallClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=str(cfg.trainer.precision),
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
        gradient_clip_val=float(cfg.train.grad_clip) or None,
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    tokens = steps * data.batch_size * data.block_size
    return {"tokens_per_sec": round(tokens / (timer.t1 - timer.t0), 1), "steps": steps}


def _steps_per_second_plain(cfg, data, model_state, steps: int, warmup: int) -> dict:
    """The same model, optimizer, schedule, clipping and batches in a plain PyTorch loop: ``LitGPT2``'s own
    ``configure_optimizers`` (for a run of ``steps + warmup`` steps, as the Trainer above is) and loss."""
    import lightning as L
    import torch

    from penwright.train.model import LitGPT2

    model = _model(cfg, data, model_state)
    model.train()
    module = LitGPT2(model, cfg.train, data.bytes_per_token)
    # a Trainer that never runs: the schedule's length is its max_steps (unless train.decay_steps fixes it)
    module.trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    optimizers = module.configure_optimizers()
    opt, sched = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    clip = float(cfg.train.grad_clip)
    batches = iter(data.train_dataloader())
    tokens, start = 0, 0.0
    for step in range(steps + warmup):
        if step == warmup:  # from here on everything counts, data loading included (as for Lightning)
            start = time.perf_counter()
        batch = next(batches)
        loss = module._loss(batch)  # the training step's loss: next-token cross-entropy in fp32
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += batch.shape[0] * (batch.shape[1] - 1)
    return {"tokens_per_sec": round(tokens / (time.perf_counter() - start), 1), "steps": steps}


def bench_train(
    steps: int = 30, rounds: int = 3, output: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Lightning's training step vs a plain PyTorch loop: same model, batch and data, alternating in one run."""
    import torch

    from penwright.core.config import compose
    from penwright.train.data import PreparedData

    cfg = compose(list(overrides or []))
    data = PreparedData(
        cfg.data.out_dir,
        int(cfg.train.block_size),
        int(cfg.train.batch_size),
        int(cfg.seed),
        int(cfg.train.val_batches),
    )
    torch.manual_seed(int(cfg.seed))
    state = _model(cfg, data, None).state_dict()
    runs: dict[str, list[float]] = {"lightning": [], "plain": []}
    for r in range(rounds):  # alternate, so drift in the machine's speed hits both alike
        for name, fn in (("plain", _steps_per_second_plain), ("lightning", _steps_per_second_lightning)):
            log(f"round {r + 1}/{rounds}: {name}, {steps} timed steps")
            runs[name].append(fn(cfg, data, state, steps, WARMUP)["tokens_per_sec"])

    lightning, plain = max(runs["lightning"]), max(runs["plain"])
    median = {k: statistics.median(v) for k, v in runs.items()}
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "python": platform.python_version(),
        },
        "model": {k: getattr(cfg.model, k) for k in ("name_or_path", "n_layer", "n_head", "n_embd")},
        "batch": {"batch_size": int(cfg.train.batch_size), "block_size": int(cfg.train.block_size)},
        "tokens_per_sec": runs,
        "best_tokens_per_sec": {"lightning": lightning, "plain": plain},
        "lightning_over_plain": round(lightning / plain, 4),
        "lightning_overhead_pct": round(100 * (1 - lightning / plain), 2),
        "median_tokens_per_sec": median,
        "lightning_overhead_pct_median": round(100 * (1 - median["lightning"] / median["plain"]), 2),
        "round_to_round_spread_pct": round(100 * max((max(v) - min(v)) / max(v) for v in runs.values()), 2),
        "goal": "Lightning overhead <= 3% of the plain loop's tokens/s",
        "measured": f"wall clock from the first timed step to the end of the last, data loading included, "
        f"after {WARMUP} untimed warmup steps; best of the rounds; same init, batches, optimizer, schedule, "
        f"clipping",
    }
    quick = Path(cfg.paths.reports) / "train.json"
    if quick.is_file():
        q = json.loads(quick.read_text())
        results["quickstart_from_reports_train_json"] = {
            k: q.get(k) for k in ("wall_seconds", "steps", "val_bpb", "val_loss", "tokens_per_sec")
        }
    write_report(
        results,
        output,
        "benchmarks/results/bench_train.json",
        {
            k: results[k]
            for k in (
                "best_tokens_per_sec",
                "lightning_overhead_pct",
                "lightning_overhead_pct_median",
                "round_to_round_spread_pct",
            )
        },
    )
    return results


# -- full finetuning vs LoRA (python -m benchmarks train --lora) ---------------------------------------------

LORA_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024)}  # (n_layer, n_head, n_embd)
LORA_LR = {"full": 6e-4, "lora": 2e-3}  # each method at its usual peak lr (the lora preset's)


def lora_case(prepared: str, base: str, run: str, method: str, steps: int, block: int, batch: int) -> dict:
    """One real train-stage run (full or LoRA) on a saved base, in a fresh process: what it measured."""
    import resource

    from penwright.core.config import compose
    from penwright.train.stage import train

    overrides = [
        f"data.out_dir={prepared}",
        "model=gpt2",
        f"model.name_or_path={base}",
        f"train.ckpt_dir={run}/ckpt",
        f"train.out_dir={run}/model",
        f"paths.reports={run}/reports",
        f"train.lora.enabled={str(method == 'lora').lower()}",
        f"train.lr={LORA_LR[method]}",
        f"train.block_size={block}",
        f"train.batch_size={batch}",
        f"trainer.max_steps={steps}",
        "train.warmup_steps=2",
        f"train.val_every_n_steps={steps}",
        "train.val_batches=4",
        f"train.ckpt_every_n_steps={steps}",
        "train.resume=false",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "logger=none",
        "sample.every_n_steps=0",
        "sample.prompts=[]",
        "sample.unconditional=0",
        "sample.random_prompts=0",
        "sample.max_new_tokens=1",
    ]
    metrics = train(compose(overrides))
    losses = [float(r.split("\t")[1]) for r in (Path(run) / "reports/curves/train.tsv").read_text().splitlines()[1:]]
    return {
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "tokens_per_sec": metrics["tokens_per_sec_median_step"],
        "checkpoint_mb": round((Path(run) / "ckpt" / "last.ckpt").stat().st_size / 1e6, 2),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "val_loss": metrics["val_loss"],
        "lr": LORA_LR[method],
    }


def bench_lora(
    steps: int = 10,
    block: int = 256,
    batch: int = 2,
    output: str | None = None,
    shapes: dict[str, tuple[int, int, int]] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Full finetuning vs LoRA on random bases in GPT-2's real shapes, from the same start, on the quickstart's
    prepared sample corpus: peak RSS, tokens/s, checkpoint size, loss after the same steps. Each run is the real
    train stage in its own process (its peak RSS is its own); full and LoRA alternate. Written into the
    ``lora`` section of benchmarks/results/bench_train.json (the rest of the report is kept)."""
    import shutil

    from benchmarks.common import BENCH_DIR, fresh_dir, random_gpt2, run_child
    from penwright.core.config import compose
    from penwright.core.errors import PenwrightError

    shapes = shapes or LORA_SHAPES
    cfg = compose(list(overrides or []))
    prepared = Path(cfg.data.out_dir)
    if not (prepared / "train.bin").is_file():
        raise PenwrightError(f"{prepared}/train.bin: missing; run `dvc repro` (or penwright prepare) first")
    work = fresh_dir(BENCH_DIR / "lora")
    results: dict = {}
    try:
        for shape, sizes in shapes.items():
            base = work / f"base-{shape}"
            random_gpt2(tuple(sizes)).save_pretrained(base)  # the same start for both methods
            row = {}
            for method in ("full", "lora"):
                log(f"{shape}: {method}, {steps} steps of {batch} x {block} tokens")
                run = work / f"{shape}-{method}"
                row[method] = run_child(
                    "benchmarks.train",
                    "lora_case",
                    str(prepared),
                    str(base),
                    str(run),
                    method,
                    steps,
                    block,
                    batch,
                )
                shutil.rmtree(run, ignore_errors=True)
            full, lora = row["full"], row["lora"]
            row["lora_over_full"] = {
                "peak_rss": round(lora["peak_rss_gb"] / full["peak_rss_gb"], 3),
                "tokens_per_sec": round(lora["tokens_per_sec"] / full["tokens_per_sec"], 3),
                "checkpoint_size": round(lora["checkpoint_mb"] / full["checkpoint_mb"], 4),
            }
            results[shape] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = {
        "shapes": {k: dict(zip(("n_layer", "n_head", "n_embd"), shapes[k])) for k in results},
        "batch": {"batch_size": batch, "block_size": block, "steps": steps, "timed": "the median step"},
        "corpus": str(prepared),
        "measured": "one run each, full then LoRA, each the train stage in a fresh process; random weights in "
        "the real shapes (vocabulary 50257), the same base for both; rank 8 on c_attn, attn.c_proj, c_fc, "
        "mlp.c_proj; peak RSS of the process (ru_maxrss); tokens/s of the median step",
        **results,
    }
    path = Path(output or "benchmarks/results/bench_train.json")
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["lora"] = section
    write_report(
        report, path, "benchmarks/results/bench_train.json", {k: v["lora_over_full"] for k, v in results.items()}
    )
    return section
