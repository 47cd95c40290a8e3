"""Read what ``prepare`` wrote: the token memmaps and meta.json, and cut them into training windows.

A window is ``block_size + 1`` consecutive tokens (inputs and next-token targets). A split
shorter than that (gpt-2-simple users finetuned on a three-sentence passage and had to paste it
until it filled 1024 tokens) is repeated end to end, each copy still closed by its EOS, until it
fills one window: no error, and a notice that says so.

A chat corpus (``prepare.chat_corpus``) has a loss mask beside each split (``<split>.mask``, one uint8 a token:
1 where the persona writes): its windows are ``(2, block_size + 1)``, the ids and the targets, which are the
ids with ``IGNORE`` where the mask is 0, so the loss counts the persona's turns only.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils import data as torch_data

from penwright.core.errors import PenwrightError
from penwright.core.files import damaged, load_tokenizer, read_json
from penwright.core.log import get_logger

IGNORE = -100  # a target the loss skips (torch's cross_entropy ignore_index)


def load_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise PenwrightError(
            f"{path}: not found. Run the prepare stage first: `penwright prepare` (or `dvc repro prepare`)"
        )
    meta = read_json(path, fix="rerun `penwright prepare`")
    if not isinstance(meta, dict):
        raise damaged(path, f"holds a JSON {type(meta).__name__}, not an object", "rerun `penwright prepare`")
    return meta


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


def load_mask(prepared_dir: str | Path, split: str) -> np.ndarray | None:
    """The ``split``'s loss mask (a chat corpus's), or None where every token counts."""
    meta = load_meta(prepared_dir)
    if not meta.get("chat", {}).get("mask"):
        return None
    path = Path(prepared_dir) / f"{split}.mask"
    if not path.is_file() or path.stat().st_size != meta[split]["tokens"]:
        raise PenwrightError(f"{path}: missing, or not one byte per token of {split}.bin; rerun `penwright prepare`")
    return np.memmap(path, dtype=np.uint8, mode="r") if meta[split]["tokens"] else np.zeros(0, dtype=np.uint8)


def load_openings(prepared_dir: str | Path) -> list[dict]:
    """A chat corpus's openings for training samples (``openings.json``: val contexts and the persona's reply)."""
    path = Path(prepared_dir) / "openings.json"
    return read_json(path, fix="rerun `penwright prepare`") if path.is_file() else []


class TokenWindows:
    """Windows of ``block_size + 1`` tokens starting every ``stride`` tokens (a torch-style dataset); with a loss
    ``mask``, each window is ``(ids, targets)``: shape ``(2, block_size + 1)``."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        stride: int | None = None,
        name: str = "split",
        mask: np.ndarray | None = None,
    ):
        if block_size < 1:
            raise PenwrightError(f"block_size={block_size}: must be at least 1")
        if tokens.size == 0:
            raise PenwrightError(f"the {name} split has no tokens; lower data.val_fraction or add text")
        need = block_size + 1
        self.repeated = tokens.size < need
        if self.repeated:
            copies = -(-need // tokens.size)
            get_logger("data").info(
                f"the {name} split has {tokens.size} tokens, fewer than one window of {need}: "
                f"it is repeated {copies}x to fill one"
            )
            tokens = np.tile(np.asarray(tokens), copies)
            mask = None if mask is None else np.tile(np.asarray(mask), copies)
        self.tokens, self.mask = tokens, mask
        self.block_size = block_size
        self.stride = stride or block_size
        self.count = (tokens.size - need) // self.stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(i)
        start = i * self.stride
        ids = np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64)
        if self.mask is None:
            return ids
        return np.stack([ids, np.where(self.mask[start : start + self.block_size + 1] != 0, ids, IGNORE)])


class RandomWindows(torch_data.IterableDataset):
    """An endless stream of training windows at random offsets, a pure function of (seed, sample index).

    Sample ``i`` is the same window in every run with the same seed, so a run resumed at step ``s``
    reads exactly the windows an uninterrupted run would (``start`` = samples already consumed).
    Ranks of a distributed run take interleaved sample indices.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        mask: np.ndarray | None = None,
    ):
        self.windows = TokenWindows(tokens, block_size, stride=1, name="train", mask=mask)
        self.seed, self.start, self.rank, self.world = seed, start, rank, world

    def window(self, index: int) -> np.ndarray:
        offset = int(np.random.default_rng([self.seed, index]).integers(len(self.windows)))
        return self.windows[offset]

    def __iter__(self):
        index = self.start + self.rank
        while True:
            yield torch.from_numpy(self.window(index))
            index += self.world


class PreparedData(L.LightningDataModule):
    """Train and validation batches from the prepare stage's memmaps.

    Validation uses a fixed, deterministic set of windows: ``val_batches`` batches spread evenly over
    the validation split (the training split when there is none, with a notice).
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        block_size: int,
        batch_size: int,
        seed: int,
        val_batches: int,
        accumulate: int = 1,
    ):
        super().__init__()
        self.prepared_dir = Path(prepared_dir)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.val_batches, self.accumulate = val_batches, accumulate
        self.meta = load_meta(self.prepared_dir)
        self.train_tokens = load_tokens(self.prepared_dir, "train")
        self.val_tokens = load_tokens(self.prepared_dir, "val")
        self.train_mask, self.val_mask = load_mask(self.prepared_dir, "train"), load_mask(self.prepared_dir, "val")
        if self.train_tokens.size == 0:
            raise PenwrightError(f"{self.prepared_dir}/train.bin is empty: add text or lower data.val_fraction")
        if self.val_tokens.size == 0:
            get_logger("data").info("no validation split (data.val_fraction=0): validating on training windows")
            self.val_tokens, self.val_mask = self.train_tokens, self.train_mask

    @staticmethod
    def load_tokenizer(prepared_dir: str | Path):
        """The tokenizer ``prepare`` saved in ``<prepared_dir>/tokenizer`` (the same files online or off); a damaged
        file in it is one line naming it."""
        return load_tokenizer(Path(prepared_dir) / "tokenizer", fix="rerun `penwright prepare`")

    @property
    def bytes_per_token(self) -> float | None:
        """Bytes of text per token the val loss counts (a chat's: the persona's turns only)."""
        split = self.meta["val"] if self.meta["val"]["tokens"] else self.meta["train"]
        tokens, size = split.get("loss_tokens", split["tokens"]), split.get("loss_bytes", split["bytes"])
        return size / tokens if tokens else None

    def train_dataloader(self):
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        start = step * self.batch_size * self.accumulate * world
        dataset = RandomWindows(self.train_tokens, self.block_size, self.seed, start, rank, world, self.train_mask)
        return torch_data.DataLoader(dataset, batch_size=self.batch_size, num_workers=0)

    def val_dataloader(self):
        windows = TokenWindows(self.val_tokens, self.block_size, stride=self.block_size, name="val", mask=self.val_mask)
        count = min(len(windows), self.val_batches * self.batch_size)
        picks = np.linspace(0, len(windows) - 1, num=count).round().astype(int)
        batch = np.stack([windows[i] for i in picks])
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        mine = torch.from_numpy(batch[rank::world])
        return torch_data.DataLoader(
            torch_data.TensorDataset(mine),
            batch_size=self.batch_size,
            collate_fn=lambda rows: torch.stack([r[0] for r in rows]),
        )
