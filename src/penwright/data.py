"""Read what ``prepare`` wrote: the token memmaps and meta.json, and cut them into training windows.

A window is ``block_size + 1`` consecutive tokens (inputs and next-token targets). A split
shorter than that (gpt-2-simple users finetuned on a three-sentence passage and had to paste it
until it filled 1024 tokens) is repeated end to end, each copy still closed by its EOS, until it
fills one window: no error, and a notice that says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from penwright.errors import PenwrightError


def load_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise PenwrightError(
            f"{path}: not found. Run the prepare stage first: `penwright prepare` (or `dvc repro prepare`)"
        )
    return json.loads(path.read_text())


def load_tokens(prepared_dir: str | Path, split: str) -> np.memmap | np.ndarray:
    """The ``split`` token ids as a read-only memmap (an empty array for an empty split)."""
    meta = load_meta(prepared_dir)
    path = Path(prepared_dir) / f"{split}.bin"
    if not path.is_file():
        raise PenwrightError(f"{path}: not found; rerun `penwright prepare`")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if tokens.size != meta[split]["tokens"]:
        raise PenwrightError(
            f"{path}: holds {tokens.size} tokens but meta.json says {meta[split]['tokens']}; rerun `penwright prepare`"
        )
    return tokens


class TokenWindows:
    """Windows of ``block_size + 1`` tokens starting every ``stride`` tokens (a torch-style dataset)."""

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int | None = None, name: str = "split"):
        if block_size < 1:
            raise PenwrightError(f"block_size={block_size}: must be at least 1")
        if tokens.size == 0:
            raise PenwrightError(f"the {name} split has no tokens; lower data.val_fraction or add text")
        need = block_size + 1
        self.repeated = tokens.size < need
        if self.repeated:
            copies = -(-need // tokens.size)
            print(
                f"[data] the {name} split has {tokens.size} tokens, fewer than one window of {need}: "
                f"it is repeated {copies}x to fill one",
                file=sys.stderr,
            )
            tokens = np.tile(np.asarray(tokens), copies)
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride or block_size
        self.starts = np.arange(0, tokens.size - need + 1, self.stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.starts[i])
        return np.asarray(self.tokens[start:start + self.block_size + 1], dtype=np.int64)
