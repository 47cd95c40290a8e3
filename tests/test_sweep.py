"""``penwright sweep``: bad sweep files refused before any trial; a real Optuna search of real ``dvc exp run``s
(pruning, W&B groups from the offline run files, kill -9 and resume, two workers on one storage); a grid through
DVC's queue."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.dvc_project import new_project, run
from helpers.tiny import TINY_MODEL

TINY = [
    *TINY_MODEL,
    "model.dropout=0.0",
    "data.path=data/tiny",
    "data.val_fraction=0.25",
    "model.tokenizer.vocab_size=300",
    "train.block_size=32",
    "train.batch_size=4",
    "train.warmup_steps=0",
    "train.val_every_n_steps=4",
    "train.val_batches=2",
    "train.ckpt_every_n_steps=4",
    "trainer.max_steps=12",
    "trainer.progress_bar=false",
    "sample.every_n_steps=0",
    "sample.max_new_tokens=4",
]


def sweep_file(path: Path, **fields) -> Path:
    body = {
        "metric": "best_val_bpb",
        "trials": 3,
        "overrides": TINY,
        "space": {"train.lr": {"low": 1e-4, "high": 0.05, "log": True}},
    }
    body.update(fields)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def penwright(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "penwright.cli", *args], cwd=cwd, capture_output=True, text=True, env=_env(), **kw
    )


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {
        **env,
        "WANDB_MODE": "offline",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


@pytest.fixture
def project(tmp_path, repo) -> Path:
    """A git + DVC project with the pipeline, a small corpus and the committed reports (as a fresh clone has)."""
    proj = new_project(tmp_path, repo, with_pipeline=True)
    corpus = proj / "data/tiny"
    corpus.mkdir(parents=True)
    for i, book in enumerate(sorted((repo / "data/kjv/books").glob("*.txt"))[:8]):  # (`penwright corpus` wrote them)
        (corpus / f"{i:02d}.txt").write_text(book.read_text()[:6000])
    shutil.copytree(repo / "reports", proj / "reports", ignore=shutil.ignore_patterns("chat", "sweeps"))
    run(["dvc", "add", "-q", "data"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "init"], proj)
    return proj


# -- bad input: one line, before anything runs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"space": {"train.lrr": {"low": 0.001, "high": 0.01}}}, "space.train.lrr: train.lrr: not a known key"),
        (
            {"space": {"train.lr": {"low": 0.001, "high": 2.0}}},
            "space.train.lr: train.lr=2.0: out of range (allowed: 0 < value <= 1)",
        ),
        (
            {"space": {"train.weight_decay": {"choices": [0.1, 20.0]}}},
            "space.train.weight_decay: train.weight_decay=20.0: out of range",
        ),
        ({"space": {"train.batch_size": {"choices": [2, 8]}}}, "space.train.batch_size: also set in overrides"),
        ({"metric": "val_accuracy"}, "metric='val_accuracy': stage 'train' writes no such metric (it writes "),
        ({"stage": "trian"}, "stage='trian': Stage 'trian' not found"),
        (
            {"storage": "sqlite:////no/such/dir/study.db"},
            "storage: 'sqlite:////no/such/dir/study.db' cannot be reached",
        ),
        ({"storage": "/no/such/dir/journal.log"}, "cannot be reached: OSError: no such directory /no/such/dir"),
        ({"trials": None}, "engine optuna needs trials"),
        ({"engine": "grid"}, "space.train.lr: a grid over a range needs step"),
        ({"space": {"train.lr": {"low": 0.01, "high": 0.001}}}, "space.train.lr: low=0.01 must be below high=0.001"),
        ({"enqueue": [{"train.lr": 0.01}, {"train.lrr": 0.01}]}, "enqueue[1].train.lrr: not a key of space (train.lr)"),
        ({"enqueue": [{"train.lr": 0.5}]}, "enqueue[0].train.lr=0.5: outside space's 0.0001..0.05"),
        (
            {"space": {"model.n_layer": {"choices": [1, 2]}}, "enqueue": [{"model.n_layer": True}]},
            "enqueue[0].model.n_layer=True: not one of space's choices [1, 2]",
        ),
        (
            {
                "space": {"train.weight_decay": {"low": 0.0, "high": 0.2, "step": 0.05}},
                "enqueue": [{"train.weight_decay": 0.07}],
            },
            "enqueue[0].train.weight_decay=0.07: not on space's grid (0.0..0.2 by 0.05)",
        ),
        (
            {"space": {"model.n_layer": {"low": 1, "high": 6}}, "enqueue": [{"model.n_layer": 4.0}]},
            "enqueue[0].model.n_layer=4.0: not a whole number (space: 1..6)",
        ),
        ({"trials": 1, "baseline": True, "enqueue": [{"train.lr": 0.01}]}, "trials=1 leaves no room for the baseline"),
        (
            {"engine": "grid", "space": {"train.lr": {"choices": [0.01]}}, "enqueue": [{"train.lr": 0.01}]},
            "enqueue is for engine optuna",
        ),
    ],
)
def test_a_bad_sweep_is_one_line_before_any_trial(tmp_path, repo, fields, message):
    bad = sweep_file(tmp_path / "bad.yaml", **fields)
    done = penwright(["sweep", str(bad)], cwd=repo)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), done.stderr
    assert message in lines[0]
    assert not (repo / "artifacts/sweeps/bad").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "conf/sweep").glob("*.yaml")))
def test_every_sweep_in_conf_passes_its_checks(repo, name, monkeypatch):
    from penwright.sweep.spec import check_space, load, metric_file

    monkeypatch.chdir(repo)
    sweep_name, spec = load(name)
    check_space(spec, name)  # every key a config key, every end of every range a value the schema takes
    metric = metric_file(spec.metric, spec.stage, name)
    assert sweep_name == name and all(
        metric_file(k, spec.stage, name).startswith(metric.split(":")[0]) for k in spec.limits
    )


def test_the_baseline_then_the_enqueued_points_come_first_and_a_resumed_sweep_queues_none_again(
    repo, tmp_path, monkeypatch
):
    from penwright.sweep.run import _distributions, open_study
    from penwright.sweep.spec import load

    monkeypatch.chdir(repo)
    points = [{"train.lr": 0.01}, {"train.lr": 0.002, "train.weight_decay": 0.05}]
    space = {"train.lr": {"low": 1e-4, "high": 0.05, "log": True}, "train.weight_decay": {"low": 0.0, "high": 0.2}}
    _, spec = load(str(sweep_file(tmp_path / "s.yaml", baseline=True, enqueue=points, space=space)))
    journal = str(tmp_path / "journal.log")

    study = open_study("s", spec, journal, "s.yaml")
    first = study.ask(_distributions(spec))  # (as the sweep asks)
    assert first.user_attrs == {"baseline": True} and first.params == {"train.lr": 0.005, "train.weight_decay": 0.06}
    study.tell(first, 1.0)
    second = study.ask(_distributions(spec))
    assert second.user_attrs == {"enqueued": True} and second.params["train.lr"] == 0.01  # (the rest is drawn)
    assert 0.0 <= second.params["train.weight_decay"] <= 0.2
    study.tell(second, 2.0)

    study = open_study("s", spec, journal, "s.yaml")  # started again: the tried point is not queued again
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING"]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"train.lr": 0.002, "train.weight_decay": 0.05}]
    assert len(study.trials) == 3


def test_an_unknown_sweep_names_the_ones_there_are(repo):
    done = penwright(["sweep", "no_such_sweep"], cwd=repo)
    assert (
        done.returncode == 2
        and "conf/sweep/no_such_sweep.yaml: no such sweep file (sweeps in conf/sweep/: " in done.stderr
    )
    assert "lr" in done.stderr


# -- pruning: the train stage reports to its trial and stops when Optuna's pruner says so ---------------------


@pytest.mark.parametrize("others", [0.01, 100.0])
def test_a_trial_stops_at_the_validation_where_it_is_worse_than_the_median(
    compose_train, tmp_path, monkeypatch, others
):
    import optuna

    from penwright.core.trials import ENV, open_storage, pruner, trial_env
    from penwright.train.stage import train

    journal = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=open_storage(journal), pruner=pruner("median", 1, 0))
    for _ in range(2):  # two finished trials whose val loss was `others` at every validation
        t = study.ask()
        for step in (4, 8, 12):
            t.report(others, step)
        study.tell(t, others)
    trial = study.ask()
    monkeypatch.setenv(
        ENV, trial_env(journal, "s", trial._trial_id, {"kind": "median", "startup_trials": 1, "warmup_steps": 0})[ENV]
    )
    cfg = compose_train("trainer.max_steps=12", "trainer.log_every_n_steps=10")
    metrics = train(cfg)

    reported = optuna.load_study(study_name="s", storage=open_storage(journal)).trials[2].intermediate_values
    curve = (tmp_path / "run/reports/curves/train.tsv").read_text().splitlines()
    if others < 1:  # far better than this run: pruned at its first validation, which ends the run there
        assert metrics["pruned_at_step"] == metrics["steps"] == 4 and list(reported) == [4]
        assert metrics["early_stopped"] is False and curve[-1].split("\t")[0] == "4"  # the curve ends where it stopped
        assert (tmp_path / "run/model/model.safetensors").is_file()  # a model, as any run leaves
    else:  # far worse: never pruned, every validation reported
        assert metrics["pruned_at_step"] is None and metrics["steps"] == 12 and sorted(reported) == [4, 8, 12]
    val = {
        row.split("\t")[0]: row.split("\t")[3]  # step -> bits per byte
        for row in (tmp_path / "run/reports/curves/val.tsv").read_text().splitlines()[1:]
    }
    assert reported[4] == pytest.approx(float(val["4"]), abs=1e-4)  # what it reported: its bits per byte there


def test_a_trial_over_the_sweeps_time_limit_stops_at_once(compose_train, tmp_path, monkeypatch):
    import optuna

    from penwright.core.trials import ENV, open_storage, trial_env
    from penwright.train.stage import train

    journal = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=open_storage(journal))
    trial = study.ask()
    prune = {"kind": "none", "startup_trials": 0, "warmup_steps": 0}
    monkeypatch.setenv(ENV, trial_env(journal, "s", trial._trial_id, prune, stop_after=0.0)[ENV])
    metrics = train(compose_train("trainer.max_steps=12"))
    assert metrics["pruned_at_step"] == metrics["steps"] == 1  # over its time after its first step
    assert (tmp_path / "run/model/model.safetensors").is_file()


# -- optuna: a real search ----------------------------------------------------------------------------------


def study_trials(journal: Path, name: str) -> list:
    import optuna

    from penwright.core.trials import open_storage

    try:
        return optuna.load_study(study_name=name, storage=open_storage(str(journal))).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def wandb_runs(proj: Path, sweep: str) -> dict[str, int]:
    """Experiment name -> how many offline W&B runs of the project carry it as their name and ``sweep`` as their
    group (in a run's protobuf log, a string field is its length byte and its bytes: the group is exactly ``sweep``)."""
    from helpers.wandb_runs import wandb_record

    group = bytes([len(sweep)]) + sweep.encode()
    out: dict[str, int] = {}
    for run_dir in sorted((proj / "wandb").glob("offline-run-*")):
        record = wandb_record(run_dir, group)
        if group not in record:
            continue
        for name in re.findall(rb"%s-(\d+)" % sweep.encode(), record):
            out[f"{sweep}-{name.decode()}"] = out.get(f"{sweep}-{name.decode()}", 0) + 1
            break
    return out


def experiment_names(proj: Path) -> list[str]:
    rows = json.loads(run(["dvc", "exp", "show", "--json", "--no-fetch"], proj).stdout)
    return sorted(r["name"] for b in rows for e in b.get("experiments") or [] for r in e["revs"] if r.get("name"))


@pytest.mark.slow
def test_optuna_sweep_prunes_groups_in_wandb_and_resumes_after_kill_9(project):
    sweep_file(
        project / "conf/sweep/lrsweep.yaml",
        trials=4,
        overrides=[*TINY, "logger=wandb"],
        pruner={"kind": "median", "startup_trials": 1, "warmup_steps": 0},
        space={"train.lr": {"low": 1e-5, "high": 0.05, "log": True}, "train.weight_decay": {"choices": [0.0, 0.06]}},
        baseline=True,  # trial 0: the config as it is
        limits={"wall_seconds": "1.5x"},  # of the baseline's
    )
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "sweep"], project)
    journal = project / "artifacts/sweeps/lrsweep/journal.log"

    # a worker, killed with SIGKILL while its second trial trains
    worker = subprocess.Popen(
        [sys.executable, "-m", "penwright.cli", "sweep", "lrsweep"],
        cwd=project,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        trials = study_trials(journal, "lrsweep") if journal.is_file() else []
        if any(t.state.name == "COMPLETE" for t in trials) and any(
            t.state.name == "RUNNING" and t.user_attrs.get("pgid") for t in trials
        ):
            break
        assert worker.poll() is None, "the worker ended before its second trial"
        time.sleep(0.5)
    time.sleep(3)  # its training under way
    killed = next(t for t in study_trials(journal, "lrsweep") if t.state.name == "RUNNING")
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    table = penwright(["sweep", "lrsweep", "--summary"], cwd=project)  # the trials so far, nothing run
    assert (
        table.returncode == 0 and not (project / f"artifacts/sweeps/lrsweep/lrsweep-{killed.number + 1}.log").exists()
    )
    listed = json.loads((project / "reports/sweeps/lrsweep.json").read_text())["trials"]
    assert {r["trial"]: r["state"] for r in listed}[killed.number] == "running" and "complete" in table.stdout

    done = penwright(["sweep", "lrsweep"], cwd=project, timeout=600)  # started again: goes on where it stopped
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"trial {killed.number} (lrsweep-{killed.number}) was left running by a worker that died: run again"
        in done.stderr
    )

    trials = study_trials(journal, "lrsweep")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4  # no trial lost, none run twice
    assert [t.number for t in trials if t.state.name == "FAIL"] == [killed.number]
    retry = next(t for t in finished if t.user_attrs.get("retry_of") == killed.number)
    assert retry.params == killed.params  # the interrupted trial ran again, with its params
    assert min(t.number for t in finished) == 0  # the trial finished before the kill is kept

    # every finished trial is a DVC experiment, with the trial's params and its metric
    names = experiment_names(project)
    assert {f"lrsweep-{t.number}" for t in finished} <= set(names)
    shown = json.loads(run(["dvc", "exp", "show", "--json", "--no-fetch"], project).stdout)
    by_name = {r["name"]: r["data"] for b in shown for e in b.get("experiments") or [] for r in e["revs"]}
    for t in finished:
        data = by_name[f"lrsweep-{t.number}"]
        params = data["params"]["params.yaml"]["data"]
        assert params["train"]["lr"] == pytest.approx(t.params["train.lr"]) and params["train"]["resume"] is False
        metrics = data["metrics"]["reports/train.json"]["data"]
        if t.state.name == "COMPLETE":
            assert metrics["best_val_bpb"] == pytest.approx(t.value) and metrics.get("pruned_at_step") is None
        else:  # pruned: stopped at an evaluation, and says where
            assert metrics["pruned_at_step"] == metrics["steps"] < 12

    # every trial is a W&B run named after its experiment, in the sweep's group
    runs = wandb_runs(project, "lrsweep")
    assert all(runs.get(f"lrsweep-{t.number}") == 1 for t in finished), runs

    # the summary: trials by the metric, the best one's params, pruned ones marked
    summary = json.loads((project / "reports/sweeps/lrsweep.json").read_text())
    assert len(summary["trials"]) == 4 and summary["best"]["experiment"] in names
    values = [r["value"] for r in summary["trials"] if r["state"] == "complete"]
    assert values == sorted(values) and summary["best"]["value"] == values[0]
    assert summary["best"]["value"] == min(t.value for t in finished if t.state.name == "COMPLETE")
    baseline = next(r for r in summary["trials"] if r["trial"] == 0)
    assert baseline["baseline"] and baseline["params"] == {"train.lr": 0.005, "train.weight_decay": 0.06}
    bound = 1.5 * baseline["wall_seconds"]  # (a trial's wall_seconds is in its row)
    for r in summary["trials"]:
        if r["state"] == "complete":
            assert r["over_limits"] == (["wall_seconds"] if r["wall_seconds"] > bound else [])
    report = (project / "reports/sweeps/lrsweep.md").read_text()
    assert "Best: `" + summary["best"]["experiment"] + "`" in report
    assert "sweep lrsweep" in done.stdout and summary["best"]["experiment"] in done.stdout
    for t in finished:
        if t.state.name == "PRUNED":
            assert f"pruned at step {t.user_attrs['pruned_at_step']}" in report


@pytest.mark.slow
def test_two_workers_on_one_storage_share_the_trials(project, tmp_path):
    """Two checkouts (two machines' worth) run the same command on one journal file: every trial runs once."""
    sweep_file(project / "conf/sweep/shared.yaml", trials=4, pruner={"kind": "none"})
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "sweep"], project)
    other = tmp_path / "other"
    run(["git", "clone", "-q", str(project), str(other)], tmp_path)
    run(["dvc", "cache", "dir", str(project / ".dvc/cache")], other)  # (a shared cache, or `dvc pull` from a remote)
    run(["dvc", "checkout", "-q", "data.dvc"], other)
    (tmp_path / "shared").mkdir()
    journal = tmp_path / "shared/journal.log"

    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "penwright.cli", "sweep", "shared", "--storage", str(journal)],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cwd in (project, other)
    ]
    outputs = [w.communicate(timeout=900) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-2000:] for o in outputs]

    trials = [t for t in study_trials(journal, "shared") if not t.user_attrs.get("skipped")]
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 4
    ran = [set(experiment_names(p)) for p in (project, other)]
    assert not ran[0] & ran[1]  # no trial ran twice
    assert ran[0] | ran[1] == {f"shared-{t.number}" for t in trials}
    assert all(ran), ran  # both workers took trials
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} == {str(w.pid) for w in workers}
    last = max((project, other), key=lambda p: (p / "reports/sweeps/shared.json").stat().st_mtime)
    summary = json.loads((last / "reports/sweeps/shared.json").read_text())
    assert sorted(r["experiment"] for r in summary["trials"] if r["state"] == "complete") == sorted(ran[0] | ran[1])


@pytest.mark.slow
def test_grid_runs_every_combination_through_dvc_queue_once(project):
    sweep_file(
        project / "conf/sweep/grid.yaml",
        engine="grid",
        jobs=1,
        trials=None,
        overrides=[o for o in TINY if not o.startswith("trainer.max_steps")] + ["logger=wandb"],
        space={"train.lr": {"choices": [0.001, 0.01]}, "trainer.max_steps": {"low": 8, "high": 12, "step": 4}},
        limits={"steps": 10},  # the 12-step trials are over it: ranked after the others, whatever their metric
    )
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "sweep"], project)
    done = penwright(["sweep", "grid"], cwd=project, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 combinations: 4 queued" in done.stderr

    rows = json.loads(run(["dvc", "exp", "show", "--json", "--no-fetch"], project).stdout)
    by_name = {r["name"]: r["data"] for b in rows for e in b.get("experiments") or [] for r in e["revs"]}
    seen = set()
    for k in range(1, 5):
        data = by_name[f"grid-{k}"]
        params = data["params"]["params.yaml"]["data"]
        seen.add((params["train"]["lr"], params["trainer"]["max_steps"]))
        assert data["metrics"]["reports/train.json"]["data"]["steps"] == params["trainer"]["max_steps"]
    assert seen == {(0.001, 8), (0.001, 12), (0.01, 8), (0.01, 12)}
    assert all(
        wandb_runs(project, "grid").get(f"grid-{k}") == 1 for k in range(1, 5)
    )  # the queue's temp copies logged here

    summary = json.loads((project / "reports/sweeps/grid.json").read_text())
    trials = summary["trials"]
    assert [r["params"]["trainer.max_steps"] for r in trials] == [8, 8, 12, 12]  # within the limit first
    assert [r["over_limits"] for r in trials] == [[], [], ["steps"], ["steps"]]
    for within in (trials[:2], trials[2:]):
        assert within[0]["value"] <= within[1]["value"]
    assert summary["best"] == trials[0]
    assert "over steps" in (project / "reports/sweeps/grid.md").read_text()

    again = penwright(["sweep", "grid"], cwd=project, timeout=300)  # every combination done: nothing runs again
    assert again.returncode == 0 and "4 combinations: 0 queued" in again.stderr, again.stderr[-2000:]


def test_command_line_values_are_checked_as_the_files_are(repo):
    done = penwright(["sweep", "lr", "--trials", "0"], cwd=repo)
    assert (
        done.returncode == 2 and done.stderr.strip() == "error: --trials 0: Input should be greater than or equal to 1"
    )
