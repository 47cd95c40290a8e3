"""Overrides for a seconds-long training run: a 1-layer scratch model and a few tiny steps."""

from __future__ import annotations

TINY_MODEL = [
    "model=scratch_small",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.n_positions=64",
    "model.dropout=0.1",
]
TINY_TRAIN = [
    "train.block_size=32",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.val_every_n_steps=4",
    "train.val_batches=2",
    "train.ckpt_every_n_steps=4",
    "train.keep_freed_memory=false",  # glibc's defaults in the test process (mallopt holds for a whole process)
    "trainer.log_every_n_steps=1",
    "trainer.progress_bar=false",
    "logger=none",
    "sample.every_n_steps=4",
    "sample.max_new_tokens=6",
    "sample.temperatures=[0.5,1.0]",
]
