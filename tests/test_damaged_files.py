"""A damaged file people do meet (a cut download or copy, garbage bytes) is one line naming it and what to do.

Each test damages a copy of a real file (model weights, config.json, tokenizer files, meta.json, the ONNX
graph) in tmp_path, runs the real stage or loader on it, and checks the ``PenwrightError``: one line, the
file's path, and the command or step that writes it again. Nothing already written is touched.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from helpers.paths import ENGLISH, REPO
from penwright.core.errors import PenwrightError


def damage(file: Path, how: str) -> None:
    """``half``: cut to half its bytes (an interrupted copy or download); ``garbage``: random bytes, same size."""
    data = file.read_bytes()
    if how == "half":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        file.write_bytes(random.Random(0).randbytes(len(data)))
    else:
        raise ValueError(how)


def damaged_copy(src: Path, dest: Path, name: str, how: str) -> Path:
    """``src`` copied to ``dest`` with ``dest/name`` damaged; returns the damaged file."""
    shutil.copytree(src, dest)
    damage(dest / name, how)
    return dest / name


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_message(err: pytest.ExceptionInfo, file: Path, fix: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"{file}: damaged or truncated ("), message
    assert fix in message, message
    assert len(message) < 500, message
    return message


def compose(*overrides: str):
    from penwright.core.config import compose as _compose

    return _compose(list(overrides), config_dir=REPO / "conf")


MODEL_FILES = [
    ("model.safetensors", "half"),
    ("model.safetensors", "garbage"),
    ("config.json", "half"),
    ("config.json", "garbage"),
]
TOKENIZER_FILES = [("tokenizer.json", "half"), ("tokenizer.json", "garbage"), ("tokenizer_config.json", "half")]


# -- export: the trained model dir ---------------------------------------------------------------------


@pytest.mark.parametrize("name,how", MODEL_FILES + TOKENIZER_FILES)
def test_export_names_a_damaged_file_of_the_trained_model_and_keeps_the_earlier_export(
    name, how, tiny_gpt2, onnx_tiny, tmp_path
):
    from penwright.export.stage import export

    file = damaged_copy(tiny_gpt2, tmp_path / "model", name, how)
    out = tmp_path / "onnx"
    shutil.copytree(onnx_tiny, out)  # an earlier export
    before = snapshot(out)
    with pytest.raises(PenwrightError) as err:
        export(
            compose(
                f"train.out_dir={tmp_path / 'model'}", f"export.out_dir={out}", f"paths.reports={tmp_path / 'reports'}"
            )
        )
    check_message(err, file, "rerun `penwright train`")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "onnx"]  # no temp dir, no report


# -- generate / serve: the exported dir ----------------------------------------------------------------


@pytest.mark.parametrize("name,how", TOKENIZER_FILES + [("config.json", "half"), ("config.json", "garbage")])
def test_loading_an_export_names_its_damaged_tokenizer_or_config(name, how, onnx_tiny, tmp_path):
    from penwright.generate.stage import generate
    from penwright.inference.engine import Engine

    onnx_dir = tmp_path / "onnx"
    file = damaged_copy(onnx_tiny, onnx_dir, name, how)
    for padded in (False, True):
        with pytest.raises(PenwrightError) as err:
            Engine.load(onnx_dir, padded=padded)
        check_message(err, file, "re-export with `penwright export`")
    dest = tmp_path / "samples.txt"
    with pytest.raises(PenwrightError) as err:
        generate(
            compose(
                f"generate.model_dir={onnx_dir}",
                f"generate.destination={dest}",
                "generate.report=null",
                "generate.prompts=[It is]",
                "generate.max_new_tokens=4",
            )
        )
    check_message(err, file, "re-export with `penwright export`")
    assert not dest.exists()


@pytest.mark.parametrize("how", ["half", "garbage"])
def test_a_damaged_onnx_graph_is_one_line_naming_it(how, onnx_tiny, tmp_path):
    from penwright.generate.stage import generate
    from penwright.inference.engine import Engine

    onnx_dir = tmp_path / "onnx"
    file = damaged_copy(onnx_tiny, onnx_dir, "model.onnx", how)
    dest = tmp_path / "samples.txt"
    runs = [
        lambda: Engine.load(onnx_dir, padded=True),
        lambda: Engine.load(onnx_dir),
        lambda: generate(
            compose(
                f"generate.model_dir={onnx_dir}",
                f"generate.destination={dest}",
                "generate.report=null",
                "generate.prompts=[It is]",
                "generate.max_new_tokens=4",
            )
        ),
    ]
    for run in runs:
        with pytest.raises(PenwrightError) as err:
            run()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{file}: ") and "`penwright export`" in message, message
    assert not dest.exists()


# -- train: the prepared dir ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,how", [(f"tokenizer/{n}", h) for n, h in TOKENIZER_FILES] + [("meta.json", "half"), ("meta.json", "garbage")]
)
def test_train_names_a_damaged_prepared_file(name, how, prepared_tiny, compose_train, tmp_path):
    from penwright.train.stage import train

    file = damaged_copy(prepared_tiny, tmp_path / "prepared", name, how)
    with pytest.raises(PenwrightError) as err:
        train(compose_train(f"data.out_dir={tmp_path / 'prepared'}"))
    check_message(err, file, "rerun `penwright prepare`")
    assert not (tmp_path / "run").exists()  # no checkpoint dir, no model, no report


def test_a_meta_json_that_is_not_an_object_is_named(prepared_tiny, tmp_path):
    from penwright.train.data import load_meta

    shutil.copytree(prepared_tiny, tmp_path / "prepared")
    (tmp_path / "prepared" / "meta.json").write_text("[1, 2")  # cut mid-way
    with pytest.raises(PenwrightError) as err:
        load_meta(tmp_path / "prepared")
    check_message(err, tmp_path / "prepared" / "meta.json", "rerun `penwright prepare`")
    (tmp_path / "prepared" / "meta.json").write_text("[1, 2]")
    with pytest.raises(PenwrightError) as err:
        load_meta(tmp_path / "prepared")
    check_message(err, tmp_path / "prepared" / "meta.json", "rerun `penwright prepare`")


# -- pretrained dirs: finetuning (model.name_or_path), prepare (its tokenizer), verbosify.model -----------


@pytest.mark.parametrize("name,how", MODEL_FILES)
def test_finetuning_from_a_damaged_local_model_names_the_file(name, how, tiny_gpt2, compose_train, tmp_path):
    from penwright.train.stage import train

    local = tmp_path / "gpt2"
    file = damaged_copy(tiny_gpt2, local, name, how)
    with pytest.raises(PenwrightError) as err:
        train(compose_train("model=gpt2", f"model.name_or_path={local}"))
    message = check_message(err, file, "again with save_pretrained, or download it again")
    assert f"model.name_or_path={local}" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,how", TOKENIZER_FILES)
def test_prepare_with_a_damaged_pretrained_tokenizer_names_the_file(name, how, tiny_gpt2, compose_prepare, tmp_path):
    from penwright.prepare.stage import prepare

    local = tmp_path / "gpt2"
    file = damaged_copy(tiny_gpt2, local, name, how)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(ENGLISH * 4)
    out = tmp_path / "prepared"
    with pytest.raises(PenwrightError) as err:
        prepare(compose_prepare(corpus, f"model.name_or_path={local}", out_dir=out))
    message = check_message(err, file, "save the tokenizer there again with save_pretrained, or download it again")
    assert "name_or_path=" in message
    assert not out.exists()


@pytest.mark.parametrize(
    "name,how", [("model.safetensors", "half"), ("config.json", "half"), ("tokenizer.json", "half")]
)
def test_verbosify_with_a_damaged_model_dir_names_the_file(name, how, tiny_gpt2, tmp_path):
    from penwright.generate.verbosify import verbosify

    local = tmp_path / "model"
    file = damaged_copy(tiny_gpt2, local, name, how)
    doc = tmp_path / "doc.txt"
    doc.write_text(ENGLISH)
    with pytest.raises(PenwrightError) as err:
        verbosify(
            compose(f"verbosify.model={local}", f"verbosify.document={doc}", f"paths.reports={tmp_path / 'reports'}")
        )
    message = check_message(err, file, "again with save_pretrained, or download it again")
    assert f"verbosify.model={local}" in message
    assert not (tmp_path / "reports").exists()


# -- the helpers on their own --------------------------------------------------------------------------


def test_an_intact_dir_loads_and_a_dir_with_no_damage_keeps_the_loaders_error(tiny_gpt2, tmp_path):
    from penwright.core.files import check_dir, load_model, load_tokenizer

    check_dir(tiny_gpt2, "unused")  # nothing damaged: no error
    assert load_model(tiny_gpt2, "unused").config.n_layer == 2
    assert len(load_tokenizer(tiny_gpt2, "unused")) == 320
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError):  # not a damaged file: transformers' own error, for the callers to word
        load_model(empty, "unused")
