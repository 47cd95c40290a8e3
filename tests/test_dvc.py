"""DVC for real: the sample corpus hashes to data.dvc, push/pull restores it, the pipeline reruns precisely."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from penwright.sample_corpus import materialize


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # not WANDB_SERVICE: a W&B run earlier in this pytest process set it, and a child would log through
    # that process's service instead of its own
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env = {**inherited, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def new_project(tmp: Path, repo: Path, with_pipeline: bool) -> Path:
    """A fresh git + DVC project holding the repo's DVC files (and, optionally, its pipeline)."""
    proj = tmp / "proj"
    proj.mkdir()
    run(["git", "init", "-q"], proj)
    run(["dvc", "init", "-q"], proj)
    run(["dvc", "config", "core.analytics", "false"], proj)
    run(["dvc", "remote", "add", "-d", "local", str(tmp / "remote")], proj)
    shutil.copy(repo / "data.dvc", proj / "data.dvc")
    if with_pipeline:
        run(["dvc", "config", "hydra.enabled", "true"], proj)
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copy(repo / name, proj / name)
        shutil.copytree(repo / "conf", proj / "conf")
        shutil.copytree(repo / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        (proj / ".gitignore").write_text("/data\n/artifacts\n")
    return proj


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
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.block_size=32", "train.batch_size=4",
            "trainer.max_steps=4", "train.val_every_n_steps=2", "train.val_batches=1", "sample.every_n_steps=0",
            "sample.max_new_tokens=4", "logger=none", "trainer.progress_bar=false"]
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
