"""The export folder is Hub-ready: a model card that huggingface_hub's parser reads (metadata, the training's
numbers, samples with their copy measures, how to run it), no training text in it, and transformers.js's layout,
which @huggingface/transformers loads offline in Node to generate the greedy tokens penwright's engine does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.paths import ENGLISH, REPO
from penwright.core.config import compose

NODE = shutil.which("node")
PROMPTS = ["The quick brown fox", "", "In the beginning"]


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, tiny_gpt2, prepared_tiny) -> dict[str, Path]:
    """The tiny GPT-2 trained 4 steps on the tiny corpus, then exported (8-bit graph, GGUF) with its card."""
    from helpers.tiny import TINY_TRAIN
    from penwright.export.stage import export
    from penwright.train.stage import train

    root = tmp_path_factory.mktemp("card")
    common = [
        f"data.out_dir={prepared_tiny}",
        f"train.out_dir={root / 'model'}",
        f"paths.reports={root / 'reports'}",
        "model=gpt2",
        f"model.name_or_path={tiny_gpt2}",
    ]
    train(
        compose(
            [*common, f"train.ckpt_dir={root / 'ckpt'}", *TINY_TRAIN, "trainer.max_steps=4"], config_dir=REPO / "conf"
        )
    )
    export(
        compose(
            [
                *common,
                *TINY_TRAIN,  # (the same config as the training: one params file in a pipeline)
                f"export.out_dir={root / 'onnx'}",
                "export.quantize=[q8]",
                "export.gguf=[f32]",
                "export.parity_prompts=[It is,The quick brown fox]",
                "export.parity_new_tokens=4",
                "export.card_license=mit",
                "sample.copy_min_span=2",
            ],
            config_dir=REPO / "conf",
        )
    )
    return {"onnx": root / "onnx", "reports": root / "reports", "prepared": prepared_tiny}


def test_the_model_card_parses_and_says_what_the_model_is(trained_export):
    from huggingface_hub import ModelCard

    folder = trained_export["onnx"]
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    train = json.loads((trained_export["reports"] / "train.json").read_text())
    meta = json.loads((trained_export["prepared"] / "meta.json").read_text())
    assert data["license"] == "mit" and data["library_name"] == "transformers.js"
    assert data["pipeline_tag"] == "text-generation" and {"gpt2", "onnx", "gguf", "penwright"} <= set(data["tags"])
    assert "base_model" not in data  # (a local folder is no Hub model to name)
    ours = data["penwright"]
    assert ours["data_md5"] == meta["data"]["md5"] and ours["steps"] == train["steps"] == 4
    assert ours["val_loss"] == train["best_val_loss"] and ours["val_bpb"] == train["best_val_bpb"]
    text = card.text
    for runtime in ("transformers.js", "onnxruntime", "llama.cpp", "Ollama", "transformers", "hf upload"):
        assert runtime in text, runtime
    assert text.count("```text") == 3 and text.count("longest span copied from the training text") == 3
    assert "model.q8.onnx" in text and "model.f32.gguf" in text
    assert f"4 steps ({train['tokens']:,} tokens)" in text and "block 32 tokens" in text  # the training, in brief
    for line in ENGLISH.strip().splitlines():  # the card has the samples, never the training text itself
        assert line[:40] not in text.replace("```text", "")
    assert not (folder / "index").exists() and not list(folder.rglob("*.bin"))  # no copy index, no tokens


def test_a_chat_models_card_has_no_samples_unless_asked_and_warns(tmp_path, trained_export):
    """The card of a chat model (the tiny tokenizer given a chat template): no samples, a warning."""
    from huggingface_hub import ModelCard

    from penwright.core.chat_format import ChatFormat
    from penwright.export.card import write_card

    folder = tmp_path / "onnx"
    shutil.copytree(trained_export["onnx"], folder)
    cfg = compose(
        [f"data.out_dir={trained_export['prepared']}", f"paths.reports={trained_export['reports']}"],
        config_dir=REPO / "conf",
    )
    from transformers import AutoConfig, GPT2LMHeadModel

    chat = ChatFormat("Job", "Eliphaz")
    model = GPT2LMHeadModel(AutoConfig.from_pretrained(folder))  # (the card reads its shape and size)
    write_card(cfg, folder, model, {}, chat)
    card = ModelCard.load(folder / "README.md")
    assert "```text" not in card.text and "may repeat what was said" in card.text and "chat" in card.data.tags
    asked = cfg.model_copy(update={"export": cfg.export.model_copy(update={"card_samples": 1})})
    write_card(asked, folder, model, {}, chat)
    assert ModelCard.load(folder / "README.md").text.count("```text") == 1


@pytest.mark.skipif(NODE is None, reason="node not found: apt-get install nodejs npm")
def test_transformers_js_loads_the_export_and_generates_the_engines_greedy_tokens(trained_export):
    from penwright.inference.engine import Engine
    from penwright.inference.sampling import GREEDY
    from penwright.share.site import node_modules

    folder, n = trained_export["onnx"], 16
    assert (folder / "onnx" / "model.onnx").samefile(folder / "model.onnx") or (
        (folder / "onnx" / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()
    )
    node_modules(REPO / "web")  # (npm ci when the packages are missing)
    done = subprocess.run(
        [NODE, "transformers_js_greedy.mjs", str(folder), str(n), *PROMPTS],
        cwd=REPO / "web",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    engine = Engine.load(folder, slots=len(PROMPTS))
    ours = engine.generate_ids([engine.encode(p) for p in PROMPTS], n, sampling=GREEDY)
    for prompt, row, their in zip(PROMPTS, ours.tolist(), theirs):
        cut = row.index(engine.eos) + 1 if engine.eos in row else len(row)  # (both end at EOS; ours pads after it)
        assert their == row[:cut], prompt
