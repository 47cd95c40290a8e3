"""The train stage refuses bad input with a PenwrightError / ConfigError that names the key and the fix.

Every case is a real (seconds-long, CPU) run of ``penwright.train.stage.train`` on the real composed config:
no mocks.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
import torch

from penwright.core.errors import ConfigError, PenwrightError
from penwright.train.data import load_meta
from penwright.train.stage import train


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def non_finite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in state_dict.items() if torch.is_floating_point(t) and not torch.isfinite(t).all()]


# -- sizes that do not fit ---------------------------------------------------------------------------


def test_block_size_larger_than_scratch_context(compose_train, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_train("train.block_size=128"))
    message = str(info.value)
    assert "train.block_size=128" in message
    assert "n_positions=64" in message
    assert "train.block_size=64 or less" in message
    assert not (tmp_path / "run" / "ckpt" / "last.ckpt").exists()


def test_block_size_larger_than_pretrained_context(compose_train, tiny_gpt2, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_train("model=gpt2", f"model.name_or_path={tiny_gpt2}", "train.block_size=128"))
    message = str(info.value)
    assert "train.block_size=128" in message
    assert "n_positions=64" in message
    assert not (tmp_path / "run" / "ckpt" / "last.ckpt").exists()


def test_batch_size_larger_than_the_train_windows(compose_train, prepared_tiny):
    tokens = load_meta(prepared_tiny)["train"]["tokens"]
    windows = tokens - 32  # block 32: windows of 33 tokens at every offset
    batch = 100000
    assert batch > windows > 0
    with pytest.raises(ConfigError) as info:
        train(compose_train(f"train.batch_size={batch}"))
    message = str(info.value)
    assert f"train.batch_size={batch}" in message
    assert f"{windows} distinct windows" in message
    assert "train.bin" in message


# -- missing input -----------------------------------------------------------------------------------


def test_missing_prepare_output_says_to_run_prepare(compose_train, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(PenwrightError) as info:
        train(compose_train(f"data.out_dir={missing}"))
    message = str(info.value)
    assert str(missing / "meta.json") in message
    assert "`penwright prepare`" in message
    assert not missing.exists()


# -- a loss that blows up ----------------------------------------------------------------------------


def train_good_then_blow_up(compose_train, tmp_path, *blow_up: str):
    """4 good steps, then a resumed run to step 12 with ``blow_up``: (good last.ckpt, the error raised).
    The token embeddings of the checkpoint are scaled by 1e30 first: finite weights whose forward pass
    overflows fp32 (what a far too high learning rate does in a few steps)."""
    ckpt_dir = tmp_path / "run" / "ckpt"
    train(compose_train("trainer.max_steps=4"))
    good = load_ckpt(ckpt_dir / "last.ckpt")
    good["state_dict"]["model.transformer.wte.weight"] *= 1e30
    torch.save(good, ckpt_dir / "last.ckpt")
    assert good["global_step"] == 4 and not non_finite(good["state_dict"])
    with pytest.raises(PenwrightError) as info:
        train(compose_train("trainer.max_steps=12", "train.warmup_steps=0", "train.grad_clip=0", *blow_up))
    return good, info.value


def assert_stopped_on_loss_and_kept_good_checkpoint(good: dict, error: PenwrightError, ckpt_dir: Path) -> None:
    message = str(error)
    match = re.search(r"loss is (\S+) at step (\d+)", message)
    assert match, message
    assert not math.isfinite(float(match.group(1)))
    assert str(ckpt_dir) in message and "train.lr" in message
    failed_at = int(match.group(2))
    assert failed_at >= 4
    after = load_ckpt(ckpt_dir / "last.ckpt")  # still loads: written atomically, never half a file
    assert not non_finite(after["state_dict"])
    assert after["global_step"] <= failed_at
    if after["global_step"] == 4:
        assert state_hash(after["state_dict"]) == state_hash(good["state_dict"])
    assert not list(ckpt_dir.glob(".*.tmp-*"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(compose_train, tmp_path):
    """A resumed run whose loss overflows stops and keeps the checkpoint it had (with the step it failed at)."""
    good, error = train_good_then_blow_up(compose_train, tmp_path)
    assert_stopped_on_loss_and_kept_good_checkpoint(good, error, tmp_path / "run" / "ckpt")


# -- config keys and values --------------------------------------------------------------------------


def test_unknown_key_suggests_the_real_one(compose_train):
    with pytest.raises(ConfigError) as info:
        compose_train("train.lrr=0.1")
    message = str(info.value)
    assert "train.lrr" in message
    assert re.search(r"Did you mean: train\.lr\b(?!r)", message), message


def test_unknown_schedule(compose_train, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_train("train.schedule=exponential", "trainer.max_steps=2"))
    message = str(info.value)
    assert "train.schedule='exponential'" in message
    assert "one of cosine, linear, constant" in message
    assert not (tmp_path / "run" / "ckpt" / "last.ckpt").exists()  # not one step was taken


def test_unknown_schedule_fails_before_deleting_the_old_checkpoints(compose_train, tmp_path):
    ckpt_dir = tmp_path / "run" / "ckpt"
    train(compose_train("trainer.max_steps=2"))
    old = state_hash(load_ckpt(ckpt_dir / "last.ckpt")["state_dict"])
    with pytest.raises(ConfigError, match="train.schedule='exponential'"):
        train(compose_train("trainer.max_steps=2", "train.resume=false", "train.schedule=exponential"))
    assert (ckpt_dir / "last.ckpt").is_file(), "the old last.ckpt was deleted by a run that never started"
    assert state_hash(load_ckpt(ckpt_dir / "last.ckpt")["state_dict"]) == old


def test_n_embd_not_divisible_by_n_head(compose_train):
    with pytest.raises(ConfigError) as info:
        train(compose_train("model=scratch_small", "model.n_embd=30", "model.n_head=4"))
    message = str(info.value)
    assert "model.n_embd=30" in message
    assert "model.n_head=4" in message
    assert "not divisible" in message


# -- a checkpoint from another model -----------------------------------------------------------------


def test_checkpoint_of_another_model_asks_for_resume_false(compose_train, tmp_path):
    ckpt_dir = tmp_path / "run" / "ckpt"
    train(compose_train("model.n_embd=32", "trainer.max_steps=2"))
    old = load_ckpt(ckpt_dir / "last.ckpt")
    assert old["global_step"] == 2
    old_hash = state_hash(old["state_dict"])

    with pytest.raises(PenwrightError) as info:
        train(compose_train("model.n_embd=64", "trainer.max_steps=4"))
    message = str(info.value)
    assert str(ckpt_dir / "last.ckpt") in message
    assert "train.resume=false" in message
    assert state_hash(load_ckpt(ckpt_dir / "last.ckpt")["state_dict"]) == old_hash  # refused: nothing touched

    metrics = train(compose_train("model.n_embd=64", "trainer.max_steps=4", "train.resume=false"))
    assert metrics["resumed"] is False and metrics["steps"] == 4
    new = load_ckpt(ckpt_dir / "last.ckpt")
    assert new["global_step"] == 4
    assert new["state_dict"]["model.transformer.wte.weight"].shape[1] == 64
    assert math.isfinite(metrics["val_loss"])
