"""The tiny GPT-2 with other, larger random weights (greedy choices that vary), exported by the export stage;
and transformers' own log-softmax of a model, the reference scoring is checked against."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from helpers.paths import REPO


def export_reweighted(tiny_gpt2: Path, root: Path, seed: int, chat_template: str | None = None) -> tuple[Path, Path]:
    """(its Hugging Face folder, its exported folder) under ``root``: weight matrices drawn N(0, 0.25); with
    ``chat_template`` saved with its tokenizer."""
    from transformers import GPT2LMHeadModel

    from penwright.core.config import compose
    from penwright.export.stage import export

    hf = root / "hf"
    shutil.copytree(tiny_gpt2, hf)
    torch.manual_seed(seed)
    net = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.25)
    net.save_pretrained(hf)
    if chat_template:
        from transformers import AutoTokenizer

        from penwright.core.files import save_tokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf)
        tokenizer.chat_template = chat_template
        save_tokenizer(tokenizer, hf)
    export(
        compose(
            [f"train.out_dir={hf}", f"export.out_dir={root / 'onnx'}", f"paths.reports={root / 'reports'}"],
            config_dir=REPO / "conf",
        )
    )
    return hf, root / "onnx"


def log_softmax_of(model_dir: Path):
    """``logprobs(ids)``: transformers' log_softmax of the model's logits for ``ids``, [len(ids), vocab] float64."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()

    def logprobs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()

    return logprobs
