"""``model.activation``: GELU's tanh form computed as GPT-2's five ops (``gelu_new``) or one fused op
(``gelu_pytorch_tanh``) is the same function, for a new model and a pretrained one alike."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from helpers.paths import REPO
from penwright.core.config import compose
from penwright.core.errors import ConfigError
from penwright.train.model import build_model


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_the_fused_gelu_is_the_same_function_for_a_new_model():
    ids = torch.randint(0, 256, (2, 32))
    models = {}
    for name in ("gelu_new", "gelu_pytorch_tanh"):
        torch.manual_seed(0)
        cfg = compose([f"model.activation={name}"], config_dir=REPO / "conf")
        models[name] = build_model(cfg.model, vocab_size=256, eos_token_id=0, block_size=64)
        assert models[name].config.activation_function == name
    assert str(models["gelu_new"].transformer.h[0].mlp.act) != str(models["gelu_pytorch_tanh"].transformer.h[0].mlp.act)
    torch.testing.assert_close(
        logits(models["gelu_new"], ids), logits(models["gelu_pytorch_tanh"], ids), atol=1e-5, rtol=0
    )


def test_a_pretrained_model_keeps_its_weights_and_computes_the_same(tiny_gpt2, tmp_path):
    ids = torch.randint(0, 100, (1, 16))
    own = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    cfg = compose(
        ["model=gpt2", f"model.name_or_path={tiny_gpt2}", "model.activation=gelu_pytorch_tanh"],
        config_dir=REPO / "conf",
    )
    fused = build_model(cfg.model, vocab_size=own.config.vocab_size, eos_token_id=0, block_size=32)
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    torch.testing.assert_close(logits(own, ids), logits(fused, ids), atol=1e-5, rtol=0)
    fused.save_pretrained(tmp_path / "saved")  # the saved config says which: what export and GGUF read
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "saved").config.activation_function == "gelu_pytorch_tanh"


def test_another_function_is_not_swapped_silently(tiny_gpt2, tmp_path):
    other = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    other.config.activation_function = "relu"
    other.save_pretrained(tmp_path / "relu")
    cfg = compose(
        ["model=gpt2", f"model.name_or_path={tmp_path / 'relu'}", "model.activation=gelu_pytorch_tanh"],
        config_dir=REPO / "conf",
    )
    with pytest.raises(ConfigError, match=r"model.activation=gelu_pytorch_tanh: this model's activation is relu"):
        build_model(cfg.model, vocab_size=other.config.vocab_size, eos_token_id=0, block_size=32)


def test_a_checkpoint_resumes_under_the_other_form(compose_train):
    """The training fingerprint leaves the activation out: the same function either way, so a run trained before
    ``model.activation`` existed (or under the other form) continues from its checkpoint."""
    from penwright.train.stage import train

    common = ["train.decay_steps=8"]
    train(compose_train("trainer.max_steps=4", "model.activation=gelu_new", *common))
    resumed = train(compose_train("trainer.max_steps=8", "model.activation=gelu_pytorch_tanh", *common))
    assert resumed["resumed"] is True and resumed["steps"] == 8
