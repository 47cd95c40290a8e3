"""GPU presets, the automatic batch size and the GPU check's dry run, on this CPU.

What runs here: every trainer preset composes; gpu (bf16-mixed) and gpu_fp16 run a step with
``trainer.accelerator=cpu`` (Lightning has no fp16 autocast on the CPU and runs gpu_fp16 there in
bf16-mixed, saying so: fp16 with loss scaling itself is GPU-only); FSDP is GPU-only in Lightning, so on the CPU it is refused
in one line before anything is written (its strategy object is built and inspected instead);
Lightning's batch-size finder is wired through ``train`` on a small model; ``penwright check gpu
--dry`` runs every case of the GPU check with tiny shapes.
"""

from __future__ import annotations

import json

import pytest

from helpers.paths import REPO
from penwright.core.config import compose
from penwright.core.errors import ConfigError


@pytest.mark.parametrize(
    "preset,precision,strategy",
    [
        ("gpu", "bf16-mixed", "auto"),
        ("gpu_fp16", "16-mixed", "auto"),
        ("fsdp", "bf16-mixed", "fsdp"),
        ("ddp", "bf16-mixed", "ddp"),
        ("multinode", "bf16-mixed", "ddp"),
    ],
)
def test_trainer_presets_compose(preset, precision, strategy):
    tr = compose([f"trainer={preset}"], config_dir=REPO / "conf").trainer
    assert (tr.accelerator, tr.precision, tr.strategy) == ("gpu", precision, strategy)
    first = (REPO / "conf" / "trainer" / f"{preset}.yaml").read_text().splitlines()[0]
    assert first.startswith("# Used by: ") and f"trainer={preset}" in first


@pytest.mark.parametrize("preset", ["gpu", "gpu_fp16"])
def test_gpu_presets_run_a_step_on_the_cpu(compose_train, preset):
    from penwright.train.stage import train

    metrics = train(compose_train(f"trainer={preset}", "trainer.accelerator=cpu", "trainer.max_steps=2"))
    assert metrics["steps"] == 2 and metrics["val_loss"] == metrics["val_loss"]  # finite, not NaN


def test_fsdp_on_the_cpu_is_refused_in_one_line_before_anything_is_written(compose_train, tmp_path):
    from penwright.train.stage import train

    cfg = compose_train("trainer=fsdp", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError, match="fsdp runs on GPUs only"):
        train(cfg)
    assert not (tmp_path / "run" / "ckpt").exists()


def test_the_fsdp_preset_shards_each_block_and_checkpoints_its_activations():
    from lightning.pytorch.strategies import FSDPStrategy

    from penwright.train.stage import build_strategy

    strategy = build_strategy(compose(["trainer=fsdp"], config_dir=REPO / "conf").trainer)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._activation_checkpointing_kwargs  # the activation-checkpointing policy is set
    assert "auto_wrap_policy" in strategy.kwargs  # each GPT2Block its own shard unit
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    plain = build_strategy(
        compose(["trainer=fsdp", "trainer.fsdp.activation_checkpointing=false"], config_dir=REPO / "conf").trainer
    )
    assert not plain._activation_checkpointing_kwargs


@pytest.mark.parametrize(
    "requested,fits,expected",
    [
        (16, 16, (16, 1)),
        (16, 64, (16, 1)),
        (16, 8, (8, 2)),
        (64, 8, (8, 8)),
        (24, 16, (12, 2)),
        (10, 4, (4, 3)),
        (8, 1, (1, 8)),
    ],
)
def test_split_batch_keeps_the_effective_batch(requested, fits, expected):
    from penwright.train.stage import split_batch

    micro, accumulate = split_batch(requested, fits)
    assert (micro, accumulate) == expected
    assert micro <= max(1, fits) and micro * accumulate >= requested and (micro - 1) * accumulate < requested


def test_auto_batch_size_runs_lightnings_finder_and_keeps_the_effective_batch(compose_train, tmp_path):
    from penwright.train.stage import train

    cfg = compose_train(
        "train.auto_batch_size=true", "train.batch_size=4", "trainer.accumulate_grad_batches=2", "trainer.max_steps=2"
    )
    metrics = train(cfg)
    chosen = json.loads((tmp_path / "run" / "ckpt" / "batch.json").read_text())
    # on the CPU nothing runs out of memory: the finder reaches the whole effective batch in one micro-batch
    assert chosen == {"requested": 8, "fits": 8, "micro_batch": 8, "accumulate_grad_batches": 1}
    assert (metrics["micro_batch"], metrics["accumulate_grad_batches"]) == (8, 1)
    assert metrics["tokens"] == 2 * 8 * 32
    assert not list(tmp_path.rglob(".scale_batch_size_*"))  # the finder's scratch checkpoint is gone
    # the next chunk keeps the split the first one found
    (tmp_path / "run" / "ckpt" / "batch.json").write_text(
        json.dumps({**chosen, "micro_batch": 4, "accumulate_grad_batches": 2})
    )
    resumed = train(
        compose_train(
            "train.auto_batch_size=true",
            "train.batch_size=4",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=3",
        )
    )
    assert (resumed["micro_batch"], resumed["accumulate_grad_batches"]) == (4, 2) and resumed["resumed"]


def test_the_gpu_checks_dry_run_covers_every_case(tmp_path):
    from penwright.gpu_check import check_gpu

    cases = check_gpu(tmp_path / "gpu", dry=True, conf=REPO / "conf")
    runs = {k: v for k, v in cases.items() if isinstance(v, dict) and "ok" in v}
    expected = {
        "gpt2/bf16",
        "gpt2/bf16+compile",
        "gpt2/fp16",
        "gpt2-medium/memory",
        "gpt2-medium/memory/checkpointing",
        "gpt2-medium/auto_batch_size",
        "gpt2-large/memory",
        "gpt2-large/memory/checkpointing",
        "gpt2-large/auto_batch_size",
        "gpt2/fsdp-1gpu",
        "generate",
        "engine",
        *(
            f"{shape}/lora/{p}/{kind}"
            for shape in ("gpt2-large", "gpt2-xl")
            for p in ("bf16", "fp16")
            for kind in ("memory", "auto_batch_size")
        ),
    }
    assert set(runs) == expected
    failed = {k: v.get("error") for k, v in runs.items() if v["ok"] is False}
    assert not failed
    assert {k for k, v in runs.items() if v["ok"] is None} == {"gpt2/bf16+compile", "gpt2/fsdp-1gpu"}
    for key in ("gpt2/bf16", "gpt2/fp16"):
        assert runs[key]["loss_finite"] and runs[key]["tokens_per_sec"] > 0
    assert (
        runs["gpt2-medium/auto_batch_size"]["micro_batch"]
        * runs["gpt2-medium/auto_batch_size"]["accumulate_grad_batches"]
        == 8
    )
    assert runs["generate"]["batch16_tokens_per_sec"] > 0
    # the engine's CUDA path (the padded runner) on the CPU: the slot engine's greedy tokens
    assert runs["engine"]["same_tokens_as_cpu"] and runs["engine"]["batch16_tokens_per_sec"] > 0
    assert (
        0 <= runs["engine"]["fp16"]["same_tokens_as_cpu_fp32"] <= 1
        and runs["engine"]["fp16"]["batch16_tokens_per_sec"] > 0
    )
    lora = runs["gpt2-xl/lora/bf16/memory"]
    assert (
        lora["loss_finite"] and 0 < lora["checkpoint_mb"] < lora["params_m"] * 4
    )  # adapters only: under the fp32 weights alone
    assert (
        runs["gpt2-xl/lora/fp16/auto_batch_size"]["micro_batch"]
        * runs["gpt2-xl/lora/fp16/auto_batch_size"]["accumulate_grad_batches"]
        == 8
    )
    assert cases["device"]["dry"] and cases["device"]["torch"]
    summary = (tmp_path / "gpu" / "check.md").read_text()
    assert "dry run" in summary and "gpt2-large/auto_batch_size" in summary and "penwright's engine" in summary
    assert json.loads((tmp_path / "gpu" / "check.json").read_text())["gpt2/bf16"]["ok"]
    assert not (tmp_path / "gpu" / "work").exists()


def test_auto_batch_size_on_several_devices_is_refused_in_one_line(compose_train):
    from penwright.train.stage import train

    with pytest.raises(ConfigError, match="batch-size finder runs on one device"):
        train(
            compose_train("train.auto_batch_size=true", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
        )
