"""``penwright bench train``: Lightning's training step against a plain PyTorch loop -> reports/bench_train.json.

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

from penwright.bench.common import log, write_report

WARMUP = 3  # untimed steps before each timed run


def _model(cfg, data, state: dict):
    """The benchmarked model, built as the train stage builds it, with the shared initial weights."""
    from penwright.model import build_model

    model = build_model(cfg.model, data.meta["vocab_size"], data.meta["eos_token_id"], int(cfg.train.block_size))
    if state is not None:
        model.load_state_dict(state)
    return model


def _steps_per_second_lightning(cfg, data, model_state, steps: int, warmup: int) -> dict:
    import lightning as L

    from penwright.model import LitGPT2

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

    from penwright.model import LitGPT2

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

    from penwright.config import compose
    from penwright.data import PreparedData

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
        "reports/bench_train.json",
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
