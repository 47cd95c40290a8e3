"""The train stage for real on tiny models: outputs, exact resume, sampling independence, W&B offline files."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from transformers import GPT2LMHeadModel

from helpers.tiny import TINY_MODEL, TINY_TRAIN
from helpers.train_outputs import curve, weights
from helpers.wandb_runs import wandb_record, wandb_run_of
from penwright.train.stage import train


def test_train_writes_model_metrics_curves_samples_and_checkpoints(compose_train, tmp_path):
    metrics = train(compose_train("trainer.max_steps=8"))
    run = tmp_path / "run"
    model = GPT2LMHeadModel.from_pretrained(run / "model")  # Hugging Face format, loadable as is
    assert model.config.n_layer == 1
    assert (run / "model" / "tokenizer.json").is_file() and (run / "model" / "generation_config.json").is_file()
    # sampling pads on the left; the saved tokenizer stays as prepare made it (else a run resumed at its
    # end, which samples nothing before saving, would save another file)
    assert json.loads((run / "model" / "tokenizer.json").read_text())["padding"] is None
    report = json.loads((run / "reports" / "train.json").read_text())
    assert report == metrics and report["steps"] == 8 and report["tokens"] == 8 * 4 * 32
    for key in ("val_loss", "val_ppl", "val_bpb", "best_val_loss", "tokens_per_sec", "tokens_per_sec_median_step"):
        assert report[key] > 0, key
    assert report["wall_seconds"] > 0
    assert abs(report["val_ppl"] - torch.exp(torch.tensor(report["val_loss"])).item()) < 0.01 * report["val_ppl"]
    assert [int(r["step"]) for r in curve(run / "reports")] == list(range(1, 9))
    assert [int(r["step"]) for r in curve(run / "reports", "val")] == [4, 8]
    assert sorted(p.name for p in (run / "reports" / "samples").iterdir()) == ["step-000004.md", "step-000008.md"]
    text = (run / "reports" / "samples" / "step-000008.md").read_text()
    assert "## temperature 0.5" in text and "## temperature 1.0" in text and "**unconditional:**" in text
    assert {"last.ckpt", "best.ckpt"} <= {p.name for p in (run / "ckpt").iterdir()}


def test_resumed_training_equals_uninterrupted_training(compose_train, tmp_path):
    """12 steps in one run == 6 steps, then a rerun with max_steps=12: same losses, same weights."""
    common = ["train.decay_steps=12"]
    train(compose_train("trainer.max_steps=12", *common, run="straight"))
    train(compose_train("trainer.max_steps=6", *common, run="chunked"))
    resumed = train(compose_train("trainer.max_steps=12", *common, run="chunked"))
    assert resumed["resumed"] is True and resumed["steps"] == 12
    straight_curve = curve(tmp_path / "straight" / "reports")
    chunked_curve = curve(tmp_path / "chunked" / "reports")
    assert [r["step"] for r in chunked_curve] == [str(s) for s in range(1, 13)]  # continued, no repeated step
    assert [r["loss"] for r in chunked_curve] == [r["loss"] for r in straight_curve]
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "chunked" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    val_curve = curve(tmp_path / "chunked" / "reports", "val")
    again = train(compose_train("trainer.max_steps=12", *common, run="chunked"))  # done already: nothing to train
    assert again["steps"] == 12 and curve(tmp_path / "chunked" / "reports") == chunked_curve
    assert again["tokens_per_sec_median_step"] is None and again["tokens_per_sec"] > 0  # no step ran this time
    assert [r["step"] for r in curve(tmp_path / "chunked" / "reports", "val")] == [r["step"] for r in val_curve]


def test_resume_false_starts_fresh(compose_train, tmp_path):
    train(compose_train("trainer.max_steps=4"))
    fresh = train(compose_train("trainer.max_steps=4", "train.resume=false"))
    assert fresh["resumed"] is False and fresh["steps"] == 4


def test_sampling_does_not_change_the_losses(compose_train, tmp_path):
    train(compose_train("trainer.max_steps=8", "sample.every_n_steps=2", run="sampling"))
    train(compose_train("trainer.max_steps=8", "sample.every_n_steps=0", run="quiet"))
    assert len(list((tmp_path / "sampling" / "reports" / "samples").iterdir())) == 4
    assert len(list((tmp_path / "quiet" / "reports" / "samples").iterdir())) == 1  # only at the end
    assert [r["loss"] for r in curve(tmp_path / "sampling" / "reports")] == [
        r["loss"] for r in curve(tmp_path / "quiet" / "reports")
    ]
    a, b = weights(tmp_path / "sampling" / "model"), weights(tmp_path / "quiet" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetunes_a_pretrained_checkpoint_with_frozen_embeddings(compose_train, tiny_gpt2, tmp_path):
    before = GPT2LMHeadModel.from_pretrained(tiny_gpt2).state_dict()
    train(
        compose_train(
            "model=gpt2",
            f"model.name_or_path={tiny_gpt2}",
            "train.freeze_embeddings=true",
            "trainer.max_steps=3",
            "trainer.accumulate_grad_batches=2",
        )
    )
    after = weights(tmp_path / "run" / "model")
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert torch.equal(before["transformer.wpe.weight"], after["transformer.wpe.weight"])
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])


def test_wandb_offline_run_has_tables_config_and_continues_on_resume(compose_train, tmp_path, monkeypatch, repo):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    wandb_dir = tmp_path / "wb"
    overrides = ["logger=wandb", f"logger.save_dir={wandb_dir}", "logger.group=tests"]
    train(compose_train("trainer.max_steps=8", *overrides))
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "run" / "ckpt" / "wandb_run_id").read_text().strip()
    assert wandb_run_of(runs[0]) == run_id
    tables = list((runs[0] / "files" / "media" / "table").rglob("*.table.json"))
    assert len(tables) == 2  # a new table at step 4 and at step 8
    rows = json.loads(tables[0].read_text())
    assert rows["columns"] == ["step", "kind", "prompt", "temperature", "text", "longest_copied", "copied_share"]
    assert rows["data"] and all(row[5] >= 0 and 0 <= row[6] <= 1 for row in rows["data"])  # each sample's copy measures
    # offline, the run config lives in the run's protobuf log: its keys and values are stored as text
    record = wandb_record(runs[0], b"git_commit")
    dvc_md5 = hashlib.md5((repo / "data.dvc").read_bytes()).hexdigest()
    for needle in ("git_commit", "data_dvc_md5", dvc_md5, "block_size", "my-exp", "tests"):
        assert needle.encode() in record, needle
    train(compose_train("trainer.max_steps=12", *overrides))  # resumed: the same W&B run id
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(wandb_run_of(r) == run_id for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_two_cpu_processes_only_rank0_samples_logs_and_saves(tmp_path, prepared_tiny, tiny_gpt2, repo, method):
    """Lightning DDP on gloo with 2 CPU processes, through the CLI, as a user would launch it (full finetuning
    of a scratch model, and LoRA on the tiny pretrained one)."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    model = (
        TINY_MODEL
        if method == "full"
        else ["model=gpt2", f"model.name_or_path={tiny_gpt2}", "train.lora.enabled=true", "train.lora.rank=4"]
    )
    overrides = [
        f"data.out_dir={prepared_tiny}",
        f"train.ckpt_dir={run}/ckpt",
        f"train.out_dir={run}/model",
        f"paths.reports={run}/reports",
        *model,
        *TINY_TRAIN,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=6",
        "logger=wandb",
        f"logger.save_dir={run}/wb",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PL_DISABLE_FORK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "penwright.cli", "train", *overrides],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "world_size: 2" in done.stderr or "distributed_backend=gloo" in done.stderr
    report = json.loads((run / "reports" / "train.json").read_text())
    assert report["steps"] == 6 and report["tokens"] == 6 * 4 * 32 * 2  # both ranks' batches count
    assert len(list((run / "wb" / "wandb").glob("offline-run-*"))) == 1  # only rank 0 logs
    assert sorted(p.name for p in (run / "reports" / "samples").iterdir()) == ["step-000004.md", "step-000006.md"]
    assert done.stderr.count("[samples] step 4:") == 1  # rank 0 only
    GPT2LMHeadModel.from_pretrained(run / "model")
    if method == "lora":
        assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()
        state = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        assert state and all(".lora_" in k for k in state)


def test_early_stopping_keeps_the_best_step_of_the_val_curve_and_warns_of_overfitting(compose_train, tmp_path, caplog):
    """On the tiny corpus a high learning rate overfits within a few dozen steps: early stopping ends the run, the
    saved weights are those of the val curve's minimum (best.ckpt's), train.json names that step, and a warning
    says since when it overfits. A resumed run with a higher max_steps keeps the early-stopping count."""
    import logging

    overrides = ["train.lr=0.02", "train.warmup_steps=0", "train.val_every_n_steps=2", "train.ckpt_every_n_steps=2"]
    overrides += [
        "train.early_stop_patience=3",
        "train.weight_decay=0.1",
        "train.schedule=constant",
        "model.dropout=0.0",
        "sample.every_n_steps=0",
    ]
    with caplog.at_level(logging.WARNING, logger="penwright"):
        metrics = train(compose_train("trainer.max_steps=200", *overrides))
    val = [(int(r["step"]), float(r["loss"])) for r in curve(tmp_path / "run" / "reports", "val")]
    best_step = min(val, key=lambda r: r[1])[0]
    assert metrics["early_stopped"] is True and metrics["steps"] < 200
    assert metrics["best_step"] == best_step == metrics["saved_step"] < metrics["steps"]
    best = torch.load(tmp_path / "run" / "ckpt" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == best_step
    saved = weights(tmp_path / "run" / "model")
    matched = [k for k in saved if f"model.{k}" in best["state_dict"]]
    assert len(matched) >= len(saved) - 1  # (lm_head is tied to the embeddings)
    assert all(torch.equal(saved[k], best["state_dict"][f"model.{k}"]) for k in matched)
    assert any(
        "overfitting since step" in r.getMessage() and f"best step {best_step}" in r.getMessage()
        for r in caplog.records
    )
    again = train(compose_train("trainer.max_steps=300", *overrides))  # resumed: the count goes on, it stops at once
    assert again["steps"] <= metrics["steps"] + 2 * 3 and again["best_step"] == best_step
