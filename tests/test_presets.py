"""Each experiment preset (conf/experiment/*.yaml) run end to end on a tiny model, asserting on its real output.

The presets are composed from the real conf/; the tests only shrink the model and steps and point
the paths at a temp dir.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from helpers.dvc_project import new_project, run
from helpers.paths import ENGLISH, REPO
from helpers.wandb_runs import wandb_record, wandb_run_of
from penwright.core.config import compose

TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.n_positions=64",
    "train.block_size=32",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.val_every_n_steps=4",
    "train.val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.progress_bar=false",
    "sample.max_new_tokens=12",
    "sample.prompts=[In the]",
]


def preset(name: str, root: Path, *overrides: str):
    """The preset composed from conf/, shrunk, its outputs under ``root``."""
    return compose(
        [f"experiment={name}", f"paths.artifacts={root}/artifacts", f"paths.reports={root}/reports", *TINY, *overrides],
        config_dir=REPO / "conf",
    )


def corpus_dir(root: Path, n: int = 6) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(n):
        (corpus / f"{i}.txt").write_text(f"Chapter {i}.\n" + ENGLISH * 3)
    return corpus


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_char_level_tokenizes_bytes_and_samples_at_each_temperature(tmp_path):
    from penwright.prepare.stage import prepare
    from penwright.train.stage import train

    cfg = preset(
        "char_level",
        tmp_path,
        f"data.path={corpus_dir(tmp_path)}",
        "data.val_fraction=0.34",
        "trainer.max_steps=8",
        "sample.every_n_steps=4",
        "logger=none",
    )
    assert list(cfg.sample.temperatures) == [0.2, 0.5, 1.0, 1.2]
    meta = prepare(cfg)
    assert meta["vocab_size"] == 258
    text_bytes = sum(len((f"Chapter {i}.\n" + ENGLISH * 3).encode()) for i in range(6))
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == text_bytes + 6  # one token a byte, + EOS each
    train(cfg)
    samples = tmp_path / "reports" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-000004.md", "step-000008.md"]
    for step in samples.iterdir():
        text = step.read_text()
        for t in ("0.2", "0.5", "1.0", "1.2"):
            assert f"## temperature {t}" in text, (step.name, t)


def test_long_run_continues_the_same_run_in_chunks(tmp_path, monkeypatch):
    from penwright.prepare.stage import prepare
    from penwright.train.stage import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [
        f"data.path={corpus_dir(tmp_path)}",
        f"data.out_dir={tmp_path}/prepared",
        "data.val_fraction=0.34",
        f"logger.save_dir={tmp_path}",
        "model.tokenizer.vocab_size=300",
        "train.ckpt_every_n_steps=4",
        "sample.every_n_steps=4",
    ]
    prepare(preset("long_run", tmp_path, *common, "trainer.max_steps=4"))
    reports = tmp_path / "reports"
    for chunk in (4, 8, 12):
        metrics = train(preset("long_run", tmp_path, *common, f"trainer.max_steps={chunk}"))
        assert metrics["steps"] == chunk and metrics["resumed"] is (chunk > 4)
    train_curve = rows(reports / "curves" / "train.tsv")
    assert [int(r["step"]) for r in train_curve] == list(range(1, 13))  # continued, no step repeated
    assert [int(r["step"]) for r in rows(reports / "curves" / "val.tsv")] == [4, 8, 12]
    # the schedule spans train.decay_steps (5000), not each chunk: no decay to the floor at a chunk's end
    lrs = [float(r["lr"]) for r in train_curve]
    assert lrs[-1] > 0.99 * float(preset("long_run", tmp_path).train.lr)

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "artifacts" / "checkpoints" / "wandb_run_id").read_text().strip()
    assert len(runs) == 3 and all(wandb_run_of(r) == run_id for r in runs)  # one W&B run, three chunks
    assert sorted(p.name for p in (reports / "samples").iterdir()) == [
        "step-000004.md",
        "step-000008.md",
        "step-000012.md",
    ]
    # fixed checkpoint names across the chunks (no best-v1.ckpt, last-v2.ckpt, ...), and best is the run's best
    ckpts = sorted(p.name for p in (tmp_path / "artifacts" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt", "step-000012.ckpt"], ckpts
    import torch

    best = torch.load(tmp_path / "artifacts" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    val = {int(r["step"]): float(r["loss"]) for r in rows(reports / "curves" / "val.tsv")}
    assert best["global_step"] == min(val, key=val.get)


SHORT_ROWS = [
    f"The {a} {b} went to the {c}."
    for a in ("red", "old", "small", "tall")
    for b in ("fox", "man", "ship")
    for c in ("sea", "hill", "town")
]


def test_short_texts_gives_separate_stripped_texts_and_counts_copies_of_training_rows(tmp_path):
    from penwright.export.stage import export
    from penwright.generate.stage import Sample, count_copies, generate
    from penwright.prepare.stage import documents_by_split, prepare
    from penwright.train.stage import train

    data = tmp_path / "rows.csv"
    data.write_text("text\n" + "\n".join(SHORT_ROWS) + "\n")
    cfg = preset(
        "short_texts",
        tmp_path,
        f"data.path={data}",
        "data.val_fraction=0.25",
        "model.tokenizer.vocab_size=300",
        "trainer.max_steps=30",
        "train.lr=1e-2",
        "sample.every_n_steps=0",
        "logger=none",
        "export.parity_prompts=['<|startoftext|>The red']",
        "generate.nsamples=6",
        "generate.batch_size=4",
        "generate.max_new_tokens=24",
        "generate.threads=1",
    )
    prepare(cfg)
    train(cfg)
    export(cfg)
    data.rename(tmp_path / "away.csv")  # generate reads what prepare wrote (documents.json), never the corpus
    samples = generate(cfg)
    (tmp_path / "away.csv").rename(data)
    assert len(samples) == 6
    for s in samples:
        assert "<|startoftext|>" not in s.text and "<|endoftext|>" not in s.text
        assert s.text == s.text.strip()
    report = json.loads((tmp_path / "reports" / "generate.json").read_text())
    train_rows = {text.removeprefix("<|startoftext|>") for is_val, text in documents_by_split(cfg.data) if not is_val}
    assert report["samples"] == 6 and report["copies_of_train"] == sum(s.text in train_rows for s in samples)
    assert "verbatim copies of training documents" in (tmp_path / "reports" / "samples.md").read_text()
    # the count itself, on texts whose answer is known
    val_rows = {text.removeprefix("<|startoftext|>") for is_val, text in documents_by_split(cfg.data) if is_val}
    known = [
        Sample("", sorted(train_rows)[0]),
        Sample("", " " + sorted(train_rows)[1] + " "),
        Sample("", sorted(val_rows)[0]),
        Sample("", "The blue fox went to the moon."),
    ]
    assert count_copies(known, cfg.data.out_dir) == {
        "copies_of_train": 2,
        "copies_of_val": 1,
        "copy_fraction": 0.75,
        "corpus_documents": len(SHORT_ROWS),
    }


DOCUMENT = (
    "A Title\n\n"
    "The fox ran to the hill. The dog did not mind at all. It's a short text, we'll see. "
    "Numbers like 12,345 appear too. The word was written down.\n\n"
    "In the beginning was the word. The quick brown fox jumps over the lazy dog.\n"
)


def test_verbosify_expands_each_passage_keeps_it_verbatim_and_writes_no_models(compose_train, tmp_path):
    from penwright.generate.verbosify import Verbosifier, passages, verbosify
    from penwright.train.stage import train

    train(compose_train("trainer.max_steps=40", "train.lr=1e-2", "sample.every_n_steps=0"))  # a model that writes '.'
    model_dir = tmp_path / "run" / "model"
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    out = tmp_path / "out"
    cfg = preset(
        "verbosify",
        out,
        f"verbosify.model={model_dir}",
        f"verbosify.document={doc}",
        "verbosify.lr=1e-3",
        "verbosify.max_new_tokens=24",
    )
    assert (cfg.verbosify.sentences, cfg.verbosify.steps, cfg.verbosify.temperature, cfg.verbosify.top_k) == (
        3,
        1,
        0.8,
        40,
    )  # the seed's settings
    chunks = passages(DOCUMENT, 3)
    assert [p for _, p in chunks] == [
        "A Title",
        "The fox ran to the hill. The dog did not mind at all. It's a short text, we'll see.",
        "Numbers like 12,345 appear too. The word was written down.",
        "In the beginning was the word. The quick brown fox jumps over the lazy dog.",
    ]
    before = {p for p in tmp_path.rglob("*")}
    report = verbosify(cfg)
    created = {p for p in tmp_path.rglob("*")} - before
    assert {p.name for p in created if p.is_file()} == {"ruth.md", "ruth.json"}  # no per-passage model on disk
    expanded = (out / "reports" / "verbosify" / "ruth.md").read_text()
    position = 0
    for _, passage in chunks:  # every passage verbatim, in order
        position = expanded.index(passage, position) + len(passage)
    assert report["passages"] == 4 and report["expanded_passages"] >= 1
    assert report["words_out"] > report["words_in"] == len(DOCUMENT.split())
    assert report["word_ratio"] == round(report["words_out"] / report["words_in"], 3)
    assert json.loads((out / "reports" / "verbosify" / "ruth.json").read_text()) == report
    assert verbosify(cfg) | {"seconds": 0} == report | {"seconds": 0}  # seeded: the same expansion again
    # one working copy, reset to the base weights before each passage
    import torch

    v = Verbosifier(str(model_dir))
    base = {k: t.clone() for k, t in v.model.state_dict().items()}
    v.finetune(torch.tensor([v.tokenizer.encode("The fox ran.")]), steps=1, lr=1e-2)
    assert any(not torch.equal(base[k], t) for k, t in v.model.state_dict().items())
    v.reset()
    assert all(torch.equal(base[k], t) for k, t in v.model.state_dict().items())


def test_verbosify_bad_input_names_the_file_or_key(tmp_path, tiny_gpt2):
    from penwright.core.errors import PenwrightError
    from penwright.generate.verbosify import verbosify

    with pytest.raises(PenwrightError, match="verbosify.document=.*missing.txt: no such file"):
        verbosify(preset("verbosify", tmp_path, f"verbosify.document={tmp_path}/missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PenwrightError, match="empty.txt: the document is empty"):
        verbosify(preset("verbosify", tmp_path, f"verbosify.document={empty}"))
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    with pytest.raises(PenwrightError, match="verbosify.temperature=0"):
        verbosify(
            preset(
                "verbosify",
                tmp_path,
                f"verbosify.document={doc}",
                f"verbosify.model={tiny_gpt2}",
                "verbosify.temperature=0",
            )
        )


WP_ROWS = [
    f"[WP] The {a} {b} came to the {c}. [RESPONSE] And the {b} saw the {c}, and it was {d}. The end."
    for a in ("red", "old", "small")
    for b in ("fox", "king", "ship")
    for c in ("sea", "hill", "town")
    for d in ("good", "far")
]


def test_data_take_keeps_one_part_of_each_row_and_names_a_row_that_lacks_it(tmp_path, compose_prepare):
    from penwright.core.errors import ConfigError, CorpusError
    from penwright.prepare.stage import documents_by_split

    rows = tmp_path / "wp.csv"
    rows.write_text("text\n" + "\n".join(WP_ROWS[:3]) + "\n")
    take = preset("wp_prompts", tmp_path).data.take
    cfg = compose_prepare(rows, f"data.take='{take}'")
    assert [t for _, t in documents_by_split(cfg.data)] == [
        "<|startoftext|>" + r.split("[RESPONSE]")[0].removeprefix("[WP] ").strip() for r in WP_ROWS[:3]
    ]
    rows.write_text("text\n" + WP_ROWS[0] + "\nno marks on this row\n")
    with pytest.raises(CorpusError, match=r"wp.csv: line 3: data.take=.* finds no text in 'no marks on this row'"):
        list(documents_by_split(compose_prepare(rows, f"data.take='{take}'").data))
    with pytest.raises(ConfigError, match="exactly one"):
        list(documents_by_split(compose_prepare(rows, "data.take=WP").data))


@pytest.mark.slow
def test_writing_prompts_pipeline_trains_both_models_in_one_wandb_group_and_writes_pairs(tmp_path, repo):
    """The real sub-pipeline (dvc repro pipelines/writing_prompts/dvc.yaml) on tiny models and a tiny corpus."""
    proj = new_project(tmp_path, repo, with_pipeline=True)
    shutil.copytree(repo / "pipelines", proj / "pipelines")
    (proj / "data").mkdir()
    (proj / "data" / "wp.csv").write_text("text\n" + "\n".join(WP_ROWS) + "\n")
    tiny = [
        "data.path=data/wp.csv",
        "data.val_fraction=0.2",
        "model.tokenizer.vocab_size=300",
        *TINY,
        "trainer.max_steps=20",
        "train.lr=1e-2",
        "sample.every_n_steps=10",
        "logger.save_dir=.",
        "export.parity_prompts=[The red fox]",
        "chain.n=3",
        "chain.batch_size=2",
        "chain.prompt_tokens=16",
        "chain.response_tokens=24",
        "chain.threads=1",
    ]
    for name in ("prompts", "responses"):
        run(
            [
                "penwright",
                "params",
                f"experiment=wp_{name}",
                *tiny,
                "--output",
                f"pipelines/writing_prompts/{name}.yaml",
            ],
            proj,
        )
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "init"], proj)
    done = run(["dvc", "repro", "pipelines/writing_prompts/dvc.yaml"], proj)
    for stage in ("prepare@prompts", "train@responses", "export@prompts", "chain"):
        assert f"pipelines/writing_prompts/dvc.yaml:{stage}" in done.stdout, stage
    meta = json.loads((proj / "artifacts/writing_prompts/prompts/prepared/meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(WP_ROWS)
    for name in ("prompts", "responses"):
        assert json.loads((proj / f"reports/writing_prompts/{name}/train.json").read_text())["steps"] == 20
    pairs = (proj / "reports/writing_prompts/pairs.md").read_text()
    blocks = pairs.split("\n## ")[1:]
    assert len(blocks) == 3
    for block in blocks:
        prompt, response = block.split("\n\n[RESPONSE] ")
        assert prompt.split("[WP] ", 1)[1].strip() and response.strip()  # both halves
        assert "<|" not in prompt + response
    runs = sorted((proj / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one W&B run per model ...

    records = [wandb_record(r, b"writing-prompts") for r in runs]
    assert all(records), [sorted(p.name for p in r.iterdir()) for r in runs]
    assert all(b"writing-prompts" in rec for rec in records)  # ... in one group
    assert {name for name in (b"wp-prompts", b"wp-responses") if any(name in rec for rec in records)} == {
        b"wp-prompts",
        b"wp-responses",
    }
    assert json.loads(run(["dvc", "status", "--json", "pipelines/writing_prompts/dvc.yaml"], proj).stdout) == {}


def test_chat_prepares_the_job_chat_trains_job_and_talks(tmp_path):
    """experiment=chat on the sample chat (the Book of Job as a WhatsApp export): the persona's mask, reply samples,
    an export whose Modelfile speaks the template, and `penwright chat`'s function answering as Job."""
    import io

    from penwright.export.stage import export
    from penwright.generate.chat import chat
    from penwright.prepare import kjv
    from penwright.prepare.stage import prepare
    from penwright.train.stage import train

    export_file = tmp_path / "job-whatsapp.txt"
    export_file.write_text(kjv.render_whatsapp(kjv.job_conversations(kjv.read_bible(kjv.database_path()))))
    cfg = preset(
        "chat",
        tmp_path,
        f"data.path={export_file}",
        "model.tokenizer.vocab_size=512",
        "trainer.max_steps=4",
        "sample.every_n_steps=4",
        "sample.prompts=[]",
        "sample.max_new_tokens=8",
        "generate.max_new_tokens=8",
        "export.parity_prompts=[Job said,Eliphaz said unto]",
        "logger=none",
    )
    assert cfg.data.chat.speaker == "Job" and cfg.data.chat.loss_on == "persona"
    meta = prepare(cfg)
    assert meta["chat"]["persona"] == "Job" and (tmp_path / "artifacts" / "prepared" / "train.mask").is_file()
    train(cfg)
    samples = (tmp_path / "reports" / "samples" / "step-000004.md").read_text()
    assert "**reply:**" in samples and "**unconditional:**" not in samples  # the persona's replies, nothing else
    export(cfg)
    modelfile = (tmp_path / "artifacts" / "onnx" / "Modelfile").read_text()
    assert 'else if eq .Role "assistant" }}Job: {{ .Content }}<|endoftext|>' in modelfile
    out = io.StringIO()
    talk = chat(cfg, lines=io.StringIO("What is man?\nAnswer me.\n"), out=out)
    assert [m["role"] for m in talk] == ["user", "assistant", "user", "assistant"]
    assert out.getvalue().count("Job:") == 2
