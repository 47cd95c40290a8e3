"""Shared fixtures: the real config composed from conf/, and a tiny "pretrained" GPT-2 made here.

Nothing is fetched from the Hugging Face hub or W&B: a tiny GPT-2 and its tokenizer are built
and saved with ``save_pretrained`` into a temp dir, and stand in for ``gpt2``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parents[1]

ENGLISH = (
    "In the beginning was the word, and the word was written down. It's a short text, we'll see.\n"
    "The quick brown fox jumps over the lazy dog; the dog did not mind at all.\n"
    "Numbers like 12,345 and 2026 appear too, with punctuation: commas, colons and semicolons!\n"
)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 (model + byte-level BPE tokenizer) saved with save_pretrained: our offline 'gpt2'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from penwright.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = train_bpe([ENGLISH * 4], vocab_size=320, min_frequency=2)
    tokenizer.save_pretrained(path)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture
def compose_prepare(tmp_path, tiny_gpt2):
    """``compose_prepare(corpus, *overrides)``: the real composed config, pointed at ``corpus``.

    Uses the tiny pretrained tokenizer unless the overrides pick another model.
    """
    from penwright.config import compose

    def _compose(corpus: Path, *overrides: str, out_dir: Path | None = None):
        base = [
            f"data.path={corpus}",
            f"data.out_dir={out_dir or tmp_path / 'prepared'}",
            "model=gpt2",
            f"model.name_or_path={tiny_gpt2}",
        ]
        return compose(base + list(overrides), config_dir=REPO / "conf")

    return _compose
