"""DVC for real: the sample corpus hashes to data.dvc, push/pull restores it, the pipeline reruns precisely."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers.dvc_project import new_project, run
from helpers.paths import REPO
from helpers.stage_reads import code_closure, config_reads, source
from penwright.cli import STAGES
from penwright.prepare.kjv import materialize


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sample_corpus_is_deterministic(tmp_path):
    a, b = materialize(tmp_path / "a", commit=False), materialize(tmp_path / "b", commit=False)
    assert snapshot(a) == snapshot(b)
    assert len(list((a / "books").glob("*.txt"))) == 66
    assert sum(p.stat().st_size for p in (a / "books").glob("*.txt")) > 1_000_000  # at least 1 MB of prose
    header, first = (a / "verses.csv").read_text().splitlines()[:2]
    assert header == "text" and first.startswith("In the beginning God created")


@pytest.mark.slow
def test_corpus_matches_data_dvc_and_push_pull_restores_it(tmp_path, repo):
    proj = new_project(tmp_path, repo, with_pipeline=False)
    committed = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "init"], proj)
    materialize(proj / "data", commit=True)  # what setup runs: write, check against data.dvc, cache
    assert yaml.safe_load((proj / "data.dvc").read_text())["outs"][0]["md5"] == committed
    assert json.loads(run(["dvc", "status", "--json"], proj).stdout) == {}
    before = snapshot(proj / "data")
    run(["dvc", "push", "-q"], proj)
    shutil.rmtree(proj / "data")
    shutil.rmtree(proj / ".dvc" / "cache")
    assert json.loads(run(["dvc", "status", "--json"], proj).stdout) != {}
    run(["dvc", "pull", "-q"], proj)
    assert snapshot(proj / "data") == before
    assert json.loads(run(["dvc", "status", "--json"], proj).stdout) == {}


@pytest.mark.slow
def test_pipeline_reruns_prepare_only_for_its_params_and_exp_run_composes_conf(tmp_path, repo):
    proj = new_project(tmp_path, repo, with_pipeline=True)
    materialize(proj / "data", commit=False)
    run(["dvc", "add", "-q", "data"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "init"], proj)

    run(["dvc", "repro", "prepare"], proj)  # (train has its own tests; here: what reruns prepare)
    meta = json.loads((proj / "artifacts/prepared/meta.json").read_text())
    assert meta["split"]["val_fraction"] == 0.05 and meta["data"]["files"] == 66
    assert json.loads(run(["dvc", "status", "--json", "prepare"], proj).stdout) == {}
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["model"]["n_layer"] = 12  # not a prepare param: nothing to rerun
    params["data"]["chunk_bytes"] = 65536  # changes no output: not a dependency either
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert json.loads(run(["dvc", "status", "--json", "prepare"], proj).stdout) == {}
    params["data"]["val_fraction"] = 0.2  # a prepare param: prepare is stale
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    assert "prepare" in json.loads(run(["dvc", "status", "--json", "prepare"], proj).stdout)
    run(["git", "checkout", "params.yaml"], proj)

    # dvc exp run composes conf/ into params.yaml (Hydra), then runs the stage on it
    run(["dvc", "exp", "run", "prepare", "-S", "data.val_fraction=0.1"], proj)
    assert yaml.safe_load((proj / "params.yaml").read_text())["data"]["val_fraction"] == 0.1
    meta = json.loads((proj / "artifacts/prepared/meta.json").read_text())
    assert meta["split"]["val_fraction"] == 0.1 and meta["val"]["documents"] == 7

    run(["dvc", "exp", "run", "prepare", "-S", "data=kjv_verses"], proj)  # a group swap
    meta = json.loads((proj / "artifacts/prepared/meta.json").read_text())
    assert meta["data"]["path"] == "data/kjv/verses.csv" and meta["train"]["documents"] > 30_000

    # the train stage through dvc exp run with model / trainer overrides (prepare comes from the cache)
    tiny = [
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "train.block_size=32",
        "train.batch_size=4",
        "trainer.max_steps=4",
        "train.val_every_n_steps=2",
        "train.val_batches=1",
        "sample.every_n_steps=0",
        "sample.max_new_tokens=4",
        "logger=none",
        "trainer.progress_bar=false",
    ]
    run(["dvc", "exp", "run", *[a for t in tiny for a in ("-S", t)]], proj)
    report = json.loads((proj / "reports/train.json").read_text())
    assert report["steps"] == 4 and report["val_loss"] > 0
    assert (proj / "artifacts/model/model.safetensors").is_file()

    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], proj).stdout)))
    experiments = [r for r in rows if r.get("Experiment")]
    assert len(experiments) == 3  # every run is listed, with its params and metrics
    assert sorted(r["data.val_fraction"] for r in experiments) == ["0.02", "0.05", "0.1"]
    trained = [r for r in experiments if r.get("trainer.max_steps") == "4"]
    assert len(trained) == 1 and float(trained[0]["val_loss"]) == report["val_loss"]

    # the LoRA preset through dvc exp run: the model just trained (artifacts/model) is its base; its own
    # prepared verses, adapter + merged model, ONNX export and samples under artifacts/lora, reports/lora
    # (dvc exp run removes the default pipeline's outputs, artifacts/model among them, when the experiment's
    # stages write elsewhere: the base is copied out of them first, as README says)
    shutil.copytree(proj / "artifacts/model", proj / "models/quickstart")
    lora = [t for t in tiny if not t.startswith("model.")]
    lora += ["train.lora.rank=4", "model.name_or_path=models/quickstart"]
    run(["dvc", "exp", "run", "-S", "experiment=lora", *[a for t in lora for a in ("-S", t)]], proj)
    report = json.loads((proj / "reports/lora/train.json").read_text())
    assert report["steps"] == 4 and 0 < report["adapter_bytes"] < report["merged_bytes"]
    assert json.loads((proj / "artifacts/lora/model/adapter/adapter_config.json").read_text())["r"] == 4
    assert json.loads((proj / "artifacts/lora/prepared/meta.json").read_text())["data"]["path"] == "data/kjv/verses.csv"
    assert (proj / "artifacts/lora/onnx/model.onnx").is_file() and (proj / "reports/lora/samples.md").is_file()
    assert yaml.safe_load((proj / "params.yaml").read_text())["train"]["lora"]["enabled"] is True


# -- what each stage declares: derived from its code, the same in both pipelines -------------------------

PIPELINES = {
    "main": REPO / "dvc.yaml",
    "writing_prompts": REPO / "pipelines" / "writing_prompts" / "dvc.yaml",
    "site": REPO / "pipelines" / "site" / "dvc.yaml",
}

# read by a stage, but changing none of its output: left out of its deps and params on purpose
NOT_CODE = {
    "core.errors": "exception classes: the messages, not the output",
    "core.log": "messages on stderr",
    "core.schema": "the config's types: a value it refuses stops the stage before any work",
    "train.loggers": "W&B (train): where the run is logged, not what it trains, as logger.* in params",
}
NOT_OUTPUT = {
    "data.chunk_bytes": "how much text is read at a time: the same tokens and hashes",
    "data.fast_encode": "splintr or tokenizers: the same ids (checked on a probe before it is used)",
    "data.copy_index_max_gib": "a memory budget: the same index, or none and an error",
}
NOT_OUTPUT_CODE = {"build_loggers": "logger.*: where the run is logged, not what it trains"}  # functions, by name

# the files (and directories) each stage reads, by the config key that names them
FILES = {
    "prepare": ["${data.path}"],
    "train": ["${data.out_dir}"],
    "export": ["${train.out_dir}", "${data.out_dir}", "${paths.reports}/train.json"],  # (the card's val loss)
    "generate": ["${generate.model_dir}", "${data.out_dir}"],  # documents.json, the copy index, the val split
    "verbosify": ["${train.out_dir}", "${verbosify.document}"],
    "chain": ["${chain.prompts_model}", "${chain.responses_model}"],
    "site": [  # the export, the pinned npm packages, and the page and browser runtime it copies
        "${site.model_dir}",
        "${site.web_dir}/package-lock.json",
        "src/penwright/serve/page.html",
        "src/penwright/share/penwright-web.mjs",
    ],
}
# a file dep named by another key than the one the stage reads: verbosify.model may be a hub name (gpt2),
# which DVC cannot track as a path; the dep is the trained model it defaults to (verbosify.model is a param)
STANDS_FOR = {"verbosify": {"train.out_dir": "verbosify.model"}}


@dataclass
class Stage:
    pipeline: str
    name: str  # foreach stages: one Stage per item, all with the stage's name
    item: str | None
    command: str  # penwright <command>: the stage's code is cli.STAGES' <module>.<function>(cfg)
    params_file: Path  # the file the stage runs on (--params), whose keys it declares
    params: list[str]
    code: set[str]  # src/penwright/**/*.py deps
    files: list[str]  # the other deps, as written
    resolved: list[str]  # the other deps, interpolated

    @property
    def module(self) -> str:  # dotted, under penwright: prepare.stage
        return STAGES[self.command][0].removeprefix("penwright.")

    @property
    def function(self) -> str:
        return STAGES[self.command][1]

    def values(self) -> dict:
        return yaml.safe_load(self.params_file.read_text())


def interpolate(text: str, values: dict, item: str | None = None) -> str:
    def one(match: re.Match) -> str:
        if match.group(1) == "item":
            return str(item)
        node = values
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", one, text)


def is_code(dep: str) -> bool:
    """A Python module of penwright's (the page and the browser runtime are files a stage copies)."""
    return dep.startswith("src/") and dep.endswith(".py")


def pipeline_stages(pipeline: str) -> list[Stage]:
    path = PIPELINES[pipeline]
    doc = yaml.safe_load(path.read_text())
    variables = {}
    for name in doc.get("vars") or ["params.yaml"]:  # DVC's default: params.yaml beside dvc.yaml
        variables |= yaml.safe_load((path.parent / name).read_text())
    out = []
    for name, body in doc["stages"].items():
        for item, stage in [(i, body["do"]) for i in body["foreach"]] if "foreach" in body else [(None, body)]:
            wdir = (path.parent / stage.get("wdir", ".")).resolve()
            assert wdir == REPO, f"{path}: {name}: stages run from the repository root"
            params = {}
            for entry in stage.get("params", []):
                for file, keys in entry.items() if isinstance(entry, dict) else [("params.yaml", [entry])]:
                    params.setdefault(interpolate(file, variables, item), []).extend(keys)
            assert len(params) == 1, f"{path}: {name}: one params file per stage (the one it runs on)"
            ((params_file, keys),) = params.items()
            command = re.fullmatch(r"penwright (\w+) --params (\S+)", interpolate(stage["cmd"], variables, item))
            assert command and command.group(2) == params_file, (
                f"{path}: {name}: declares the keys of the file it runs on"
            )
            deps = [interpolate(d, variables, item) for d in stage["deps"]]
            out.append(
                Stage(
                    pipeline,
                    name,
                    item,
                    command.group(1),
                    REPO / params_file,
                    list(keys),
                    code={d for d in deps if is_code(d)},
                    files=[d for d in stage["deps"] if not is_code(d)],
                    resolved=[d for d in deps if not is_code(d)],
                )
            )
    return out


ALL_STAGES = [s for p in PIPELINES for s in pipeline_stages(p)]


def stage_id(stage: Stage) -> str:
    return f"{stage.pipeline}:{stage.name}" + (f"@{stage.item}" if stage.item else "")


def leaf(key: str, values: dict) -> str:
    """``key`` cut at the first part that is a value, not a group (``generate.delimiter.join``: a str method)."""
    parts, node = key.split("."), values
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return ".".join(parts[:i])
        if part not in node:  # a key this params file leaves out (trainer.fsdp): as it is read
            return key
        node = node[part]
    return key


def under(key: str, group: str) -> bool:
    return key == group or key.startswith(group + ".")


def keys_read(stage: Stage) -> set[str]:
    values = stage.values()
    reads = {leaf(k, values) for k in config_reads(stage.module, stage.function, skip=set(NOT_OUTPUT_CODE))}
    return {k for k in reads if not any(under(k, n) for n in NOT_OUTPUT)}


@pytest.mark.parametrize("stage", ALL_STAGES, ids=stage_id)
def test_a_stage_is_named_for_the_command_it_runs(stage):
    """`dvc repro <file>:chain` runs `penwright chain`: one name for one step, in the pipeline and the CLI."""
    assert stage.name == stage.command, f"{stage.pipeline}: stage {stage.name!r} runs `penwright {stage.command}`"


@pytest.mark.parametrize("stage", ALL_STAGES, ids=stage_id)
def test_a_stage_declares_every_penwright_module_it_imports(stage):
    expected = {source(m).relative_to(REPO).as_posix() for m in code_closure(stage.module, skip=NOT_CODE)}
    assert sorted(stage.code) == sorted(expected)


@pytest.mark.parametrize("stage", ALL_STAGES, ids=stage_id)
def test_a_stage_declares_exactly_the_config_keys_it_reads(stage):
    reads, declared, values = keys_read(stage), stage.params, stage.values()
    assert "" not in reads, f"{stage.module} reads the whole config"
    undeclared = sorted(k for k in reads if not any(under(k, d) for d in declared))
    unread = sorted(d for d in declared if not any(under(k, d) for k in reads))
    assert not undeclared, f"read but not in params: {undeclared}"
    assert not unread, f"in params but never read: {unread}"
    for group in declared:  # a whole group declared: the stage reads all of it
        node = values
        for part in group.split("."):
            node = node[part]
        if isinstance(node, dict) and group not in reads:
            left = sorted(
                k for k in (f"{group}.{key}" for key in node) if not any(under(r, k) or under(k, r) for r in reads)
            )
            assert not left, f"{group} is declared whole, but the stage never reads {left}: declare the keys it reads"
        changes_nothing = [n for n in NOT_OUTPUT if under(n, group)]
        assert not changes_nothing, (
            f"{group} declares {changes_nothing}, which change no output: declare its other keys"
        )
    assert len(declared) == len(set(declared))


@pytest.mark.parametrize("stage", ALL_STAGES, ids=stage_id)
def test_a_stage_declares_the_files_it_reads(stage):
    expected = FILES[stage.name]
    aliases = STANDS_FOR.get(stage.name, {})
    named = {aliases.get(k, k) for f in expected for k in re.findall(r"\$\{([^}]+)\}", f)}
    assert named <= keys_read(stage), "FILES names a key the stage does not read"
    assert sorted(stage.resolved) == sorted(interpolate(f, stage.values()) for f in expected)
    if stage.pipeline != "writing_prompts":  # through the keys, so a path changed in params.yaml changes the deps
        assert sorted(stage.files) == sorted(expected)


@pytest.mark.parametrize("stage", [s for s in ALL_STAGES if s.pipeline == "writing_prompts"], ids=stage_id)
def test_the_writing_prompts_stages_declare_what_the_main_pipeline_does(stage):
    """The same stage on another params file: the same params list, code and files (so the lists cannot drift)."""
    main = {s.name: s for s in pipeline_stages("main")}
    if stage.name not in main:
        pytest.skip(f"{stage.name}: only in the {stage.pipeline} pipeline")
    twin = main[stage.name]
    assert stage.params == twin.params
    assert stage.code == twin.code
    assert sorted(stage.resolved) == sorted(interpolate(f, stage.values()) for f in twin.files)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_each_lock_file_records_the_code_as_committed(pipeline):
    """dvc.lock holds the hash of every src/ file a stage depends on: a code change committed without rerunning
    the stage (or `dvc commit`) would make `dvc repro` on a fresh clone rerun it."""
    lock = yaml.safe_load((PIPELINES[pipeline].parent / "dvc.lock").read_text())
    stale = sorted(
        f"{stage}: {dep['path']}"
        for stage, body in lock["stages"].items()
        for dep in body.get("deps", [])
        if dep["path"].startswith("src/")
        and (
            not (REPO / dep["path"]).is_file()
            or hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest() != dep["md5"]
        )
    )
    assert not stale, f"rerun these stages (dvc repro) or `dvc commit` them: {stale}"
