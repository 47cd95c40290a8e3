"""LoRA finetuning (train.lora, peft) on the tiny "pretrained" GPT-2: what trains, what is written, exact resume,
the paths full finetuning has (samples, W&B, gradient checkpointing, the batch finder, the GPU presets), export
and generation on the merged model, and bad input in one line with nothing written over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from helpers.train_outputs import curve, weights
from helpers.wandb_runs import wandb_record
from penwright.core.errors import ConfigError, PenwrightError
from penwright.inference.sampling import GREEDY
from penwright.train.stage import train

LORA = ["train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=8", "train.lr=5e-3"]


@pytest.fixture
def compose_lora(compose_train, tiny_gpt2):
    """``compose_lora(*overrides, run=...)``: a seconds-long LoRA run on the tiny pretrained GPT-2."""

    def _compose(*overrides: str, run: str = "run"):
        return compose_train("model=gpt2", f"model.name_or_path={tiny_gpt2}", *LORA, *overrides, run=run)

    return _compose


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "adapter" / "adapter_model.safetensors"))


def test_lora_trains_only_the_adapters_and_writes_the_adapter_and_the_merged_model(compose_lora, tiny_gpt2, tmp_path):
    from peft import PeftModel

    metrics = train(compose_lora("trainer.max_steps=8"))
    run = tmp_path / "run"
    # the checkpoint holds the adapters alone (and their optimizer state)
    ckpt = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    n_layer = GPT2LMHeadModel.from_pretrained(tiny_gpt2).config.n_layer
    assert len(ckpt["state_dict"]) == 2 * 4 * n_layer  # A and B on c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert sum(len(s) for s in ckpt["optimizer_states"][0]["state"].values()) == 3 * len(ckpt["state_dict"])
    # peft's adapter folder, and the merged model in Hugging Face format beside it
    assert {"adapter_config.json", "adapter_model.safetensors", "penwright.json"} <= {
        p.name for p in (run / "model" / "adapter").iterdir()
    }
    assert json.loads((run / "model" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert metrics["adapter_bytes"] < metrics["merged_bytes"] / 2
    before, merged = GPT2LMHeadModel.from_pretrained(tiny_gpt2).state_dict(), weights(run / "model")
    assert torch.equal(before["transformer.wte.weight"], merged["transformer.wte.weight"])  # not adapted
    assert torch.equal(before["transformer.h.0.ln_1.weight"], merged["transformer.h.0.ln_1.weight"])
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], merged["transformer.h.0.attn.c_attn.weight"])
    # the merged model computes what the base with the adapter (unmerged) computes
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 11]])
    unmerged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt2), run / "model" / "adapter").eval()
    with torch.no_grad():
        a = unmerged(ids).logits
        b = GPT2LMHeadModel.from_pretrained(run / "model").eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    # the rest of the run as a full finetune has it: validation bpb, curves, samples every sample.every_n_steps
    assert metrics["val_bpb"] > 0 and metrics["steps"] == 8
    assert [int(r["step"]) for r in curve(run / "reports")] == list(range(1, 9))
    assert sorted(p.name for p in (run / "reports" / "samples").iterdir()) == ["step-000004.md", "step-000008.md"]


def test_lora_resumed_in_chunks_equals_an_uninterrupted_run(compose_lora, tmp_path):
    common = ["train.decay_steps=12"]
    train(compose_lora("trainer.max_steps=12", *common, run="straight"))
    train(compose_lora("trainer.max_steps=6", *common, run="chunked"))
    resumed = train(compose_lora("trainer.max_steps=12", *common, run="chunked"))
    assert resumed["resumed"] is True and resumed["steps"] == 12
    assert [r["loss"] for r in curve(tmp_path / "chunked" / "reports")] == [
        r["loss"] for r in curve(tmp_path / "straight" / "reports")
    ]
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "chunked")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "chunked" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_with_gradient_checkpointing_trains_the_adapters_the_same(compose_lora, tmp_path):
    train(compose_lora("trainer.max_steps=4", "sample.every_n_steps=0", run="plain"))
    train(compose_lora("trainer.max_steps=4", "sample.every_n_steps=0", "train.gradient_checkpointing=true", run="gc"))
    plain, gc = curve(tmp_path / "plain" / "reports"), curve(tmp_path / "gc" / "reports")
    assert [float(r["loss"]) for r in gc] == pytest.approx([float(r["loss"]) for r in plain], abs=1e-4)
    a, b = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "gc")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(k.endswith("lora_B.weight") and b[k].abs().sum() > 0 for k in b)  # the adapters got gradients


def test_lora_with_the_batch_finder_and_the_gpu_presets(compose_lora, tmp_path):
    metrics = train(
        compose_lora("train.auto_batch_size=true", "trainer.accumulate_grad_batches=2", "trainer.max_steps=2", run="a")
    )
    assert (metrics["micro_batch"], metrics["accumulate_grad_batches"]) == (8, 1)
    assert all(
        ".lora_" in k for k in torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    )
    for preset in ("gpu", "gpu_fp16"):  # bf16-mixed on the CPU (Lightning runs 16-mixed as bf16 there)
        m = train(compose_lora(f"trainer={preset}", "trainer.accelerator=cpu", "trainer.max_steps=2", run=preset))
        assert m["steps"] == 2 and m["val_loss"] == m["val_loss"]


def test_lora_run_in_wandb_offline_has_its_tables_and_lora_config(compose_lora, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose_lora("trainer.max_steps=8", "logger=wandb", f"logger.save_dir={tmp_path / 'wb'}"))
    (run,) = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(list((run / "files" / "media" / "table").rglob("*.table.json"))) == 2
    record = wandb_record(run, b"git_commit")
    assert b"lora" in record and b"adapter" in record


def test_lora_export_passes_parity_and_greedy_tokens_in_onnx_and_llama_cpp_equal_the_unmerged_adapter(
    compose_lora, tiny_gpt2, prepared_tiny, tmp_path
):
    from peft import PeftModel

    from penwright.core.config import compose
    from penwright.export.stage import export
    from penwright.inference.engine import Engine

    train(compose_lora("trainer.max_steps=8", "sample.every_n_steps=0"))
    model_dir, onnx = tmp_path / "run" / "model", tmp_path / "onnx"
    report = export(
        compose(
            [
                f"train.out_dir={model_dir}",
                f"data.out_dir={prepared_tiny}",  # the quantized graph is measured on its validation windows
                "train.block_size=32",
                f"export.out_dir={onnx}",
                f"paths.reports={tmp_path / 'reports'}",
                "export.parity_prompts=[It is,The quick brown fox]",
                "export.parity_new_tokens=8",
                "export.quantize=[q8]",
                "export.gguf=[f32]",
            ]
        )
    )
    assert report["parity"]["passed"] and report["parity"]["greedy_tokens_equal"]
    assert (onnx / "model.q8.onnx").is_file() and report["quantized"]["q8"]["top1_agreement"] > 0.9
    unmerged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt2), model_dir / "adapter").eval()
    gen = Engine.load(onnx, slots=1)
    ids = np.array([gen.encode("The quick brown fox")])
    with torch.no_grad():
        ref = unmerged.generate(
            input_ids=torch.tensor(ids), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, ids.shape[1] :].tolist()
    ours = gen.generate_ids(ids.tolist(), 12, stop_at_eos=False, sampling=GREEDY)[0].tolist()
    assert ours == ref
    # the merged model's GGUF in llama.cpp: its tokens and greedy continuation too
    from test_gguf import llama, llama_greedy

    llm = llama(onnx / "model.f32.gguf", n_ctx=64, n_threads=2)
    assert llm.tokenize(b"The quick brown fox", add_bos=False, special=False) == ids[0].tolist()
    assert llama_greedy(llm, ids[0].tolist(), 12) == ref


# -- bad input: one line, nothing written over --------------------------------------------------------


def test_lora_on_a_scratch_model_or_with_a_rank_larger_than_a_layer_is_refused(compose_train, compose_lora, tmp_path):
    with pytest.raises(ConfigError, match=r"train.lora.enabled=True: LoRA adapts a pretrained model"):
        compose_train("train.lora.enabled=true")
    with pytest.raises(
        ConfigError, match=r"train.lora.rank=64: larger than the layer .*\(32 x 96\); use train.lora.rank=32"
    ):
        train(compose_lora("train.lora.rank=64"))
    with pytest.raises(ConfigError, match=r"train.lora.targets=.*item 0 \('lm_head'\) not one of the choices"):
        compose_lora("train.lora.targets=[lm_head]")
    assert not (tmp_path / "run").exists()


def test_lora_on_a_model_without_gpt2_layers_is_one_line(compose_lora, tmp_path):
    from penwright.train.lora import check

    cfg = compose_lora()
    plain = torch.nn.Module()
    plain.config = type("Config", (), {"model_type": "llama"})()
    with pytest.raises(
        ConfigError, match=r"the model \(x, type llama\) has no c_attn, attn.c_proj, c_fc, mlp.c_proj layers"
    ):
        check(plain, cfg.train.lora, "x")


def test_resuming_a_lora_checkpoint_as_a_full_run_or_the_reverse_is_one_line(
    compose_lora, compose_train, tiny_gpt2, tmp_path
):
    train(compose_lora("trainer.max_steps=4", "sample.every_n_steps=0"))
    ckpt = tmp_path / "run" / "ckpt"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    full = compose_train("model=gpt2", f"model.name_or_path={tiny_gpt2}", "trainer.max_steps=8")
    with pytest.raises(
        PenwrightError,
        match=r"is a LoRA run \(train.lora.enabled=true\) and this run is a full finetune: set train.lora.enabled=true",
    ):
        train(full)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before  # nothing written over
    train(compose_train("model=gpt2", f"model.name_or_path={tiny_gpt2}", "trainer.max_steps=4", run="full"))
    with pytest.raises(
        PenwrightError, match=r"is a full finetune and this run is a LoRA run .*set train.lora.enabled=false"
    ):
        train(compose_lora("trainer.max_steps=8", run="full"))
    with pytest.raises(PenwrightError, match=r"another model, block size, tokenizer or LoRA shape"):
        train(compose_lora("trainer.max_steps=8", "train.lora.rank=2"))


def test_a_lora_checkpoint_on_other_base_weights_or_an_adapter_of_another_base_is_one_line(
    compose_lora, tiny_gpt2, tmp_path
):
    train(compose_lora("trainer.max_steps=4", "sample.every_n_steps=0"))
    other = tmp_path / "other-base"
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    model.save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((tiny_gpt2 / name).read_bytes())
    with pytest.raises(PenwrightError, match=r"trained on other base weights than model.name_or_path=.*other-base"):
        train(compose_lora("trainer.max_steps=8", f"model.name_or_path={other}"))
    adapter = tmp_path / "run" / "model" / "adapter"
    with pytest.raises(ConfigError, match=r"train.lora.adapter=.*trained on another base model"):
        train(compose_lora(f"model.name_or_path={other}", f"train.lora.adapter={adapter}", run="b"))
    with pytest.raises(ConfigError, match=r"train.lora.rank: .*adapter_config.json was trained with r=4"):
        train(compose_lora("train.lora.rank=2", f"train.lora.adapter={adapter}", run="b"))
    assert not (tmp_path / "b").exists()
    # the same base: training continues from the adapter's weights
    metrics = train(compose_lora("trainer.max_steps=2", f"train.lora.adapter={adapter}", run="c"))
    assert metrics["steps"] == 2
