"""Reading back what a training run wrote: its curves and its saved model's weights."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def curve(reports: Path, split: str = "train") -> list[dict]:
    """The rows of ``reports/curves/<split>.tsv``."""
    with open(reports / "curves" / f"{split}.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of the Hugging Face model saved in ``model_dir``."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(model_dir).state_dict()
