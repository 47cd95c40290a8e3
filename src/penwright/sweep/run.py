"""``penwright sweep NAME``: train many variants, each a DVC experiment and a W&B run of one group, and rank them.

Two engines, as the sweep file says:

* ``optuna``: a search. Each trial is one ``dvc exp run <stage> -S ...`` in this workspace, named
  ``<sweep>-<trial number>``; its training reports each val loss to Optuna, whose pruner stops a hopeless trial
  early. The study lives in a storage (a journal file by default, or a database URL); several workers, on this
  machine or others with their own checkout, run the same command on one storage and share the trials. Stopped
  (Ctrl-C, a kill) and started again, a sweep keeps its finished trials and runs the interrupted one again.
* ``grid``: every combination, through DVC's queue (``dvc exp run --queue``, ``dvc queue start -j N``); each
  named ``<sweep>-<k>``; started again, it queues only the combinations that have no experiment yet.

Every trial runs with ``train.resume=false`` (a trial never continues another's checkpoint) and, when it logs to
W&B, ``logger.group=<sweep>``. The summary (trials by the metric, the best one's params, pruned ones marked) goes
to the terminal and to ``reports/sweeps/<sweep>.md`` and ``.json``; ``dvc exp show`` lists the same experiments.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from penwright.core.atomic import atomic_write_text
from penwright.core.errors import ConfigError, PenwrightError
from penwright.core.log import get_logger
from penwright.core.trials import open_storage, trial_env
from penwright.sweep.spec import Sweep, check_space, load, metric_file, override, path_of

log = get_logger("sweep").info
FINISHED = ("COMPLETE", "PRUNED")


def sweep(
    name: str, storage: str | None = None, trials: int | None = None, jobs: int | None = None, summary: bool = False
) -> Path:
    """Run (or resume) the sweep ``name`` (``conf/sweep/<name>.yaml`` or a file); the summary report's path.
    ``summary``: no trials, only the table of the ones so far (while workers run, or after a kill)."""
    sweep_name, spec = load(name)
    source = str(path_of(name))
    for flag, key, value in (("--trials", "trials", trials), ("--jobs", "jobs", jobs)):
        if value is not None:  # checked as the file's own value is
            try:
                spec = Sweep.model_validate({**spec.model_dump(), key: value})
            except ValidationError as err:
                raise ConfigError(f"{flag} {value}: {err.errors(include_url=False)[0]['msg']}") from None
    check_space(spec, source)  # every check before the first trial
    metric = metric_file(spec.metric, spec.stage, source)
    for key in spec.limits:  # each limit a metric the stage writes, in the metric's file
        if metric_file(key, spec.stage, f"{source}: limits").split(":", 1)[0] != metric.split(":", 1)[0]:
            raise PenwrightError(f"{source}: limits.{key}: not in {metric.split(':', 1)[0]}, the metric's file")
    work = Path("artifacts/sweeps") / sweep_name
    if spec.engine == "optuna":
        url = storage or spec.storage
        if url is None:  # the default: a journal file beside the trials' logs
            work.mkdir(parents=True, exist_ok=True)
            url = str(work / "journal.log")
        rows = (
            optuna_summary(sweep_name, spec, url, source)
            if summary
            else run_optuna(sweep_name, spec, metric, url, work, source)
        )
    else:
        rows = grid_rows(sweep_name, spec, metric) if summary else run_grid(sweep_name, spec, metric, work)
    return write_summary(sweep_name, spec, metric, rows)


def trial_overrides(sweep_name: str, spec: Sweep, params: dict) -> list[str]:
    """What ``dvc exp run -S`` gets for one trial: the shared overrides, the trial's values, a fresh start, and
    the W&B group (when the run logs to W&B)."""
    from penwright.core import config

    out = [*spec.overrides, *(override(k, v) for k, v in params.items()), "train.resume=false"]
    cfg = config.compose(out)
    if cfg.logger.kind == "wandb" and not cfg.logger.group:
        out.append(f"logger.group={sweep_name}")
    return out


# -- optuna -----------------------------------------------------------------------------------------------


def _distributions(spec: Sweep) -> dict:
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, BaseDistribution] = {}
    for key, p in spec.space.items():
        if p.choices is not None:
            out[key] = CategoricalDistribution(p.choices)
            continue
        assert p.low is not None and p.high is not None  # (the file's check: a range has both)
        if p.integer:
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=1 if p.step is None else int(p.step))
        else:
            out[key] = FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)
    return out


def baseline_params(spec: Sweep, source: str) -> dict:
    """The space's keys at the values the config has without the sweep (with its overrides)."""
    from penwright.core import config

    values = config.compose(spec.overrides).to_dict()
    out: dict = {}
    for key in spec.space:
        node = values
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise PenwrightError(f"{source}: baseline: space.{key} has no single value in the config (a group?)")
            node = node[part]
        if isinstance(node, dict):
            raise PenwrightError(f"{source}: baseline: space.{key} is a group, not a value; leave baseline off")
        out[key] = node
    return out


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(study) -> None:
    """Trials this machine left running when its worker died (a kill, a crash): their training is stopped,
    the trial marked failed, and its params queued again so the next trial runs them."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker, pgid = t.user_attrs.get("worker", ""), t.user_attrs.get("pgid")
        who, _, pid = worker.rpartition(":")
        if who != host or not pid.isdigit() or alive(int(pid)):
            continue  # another machine's, or a live worker's
        if pgid:
            _stop_group(int(pgid))
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs=_retry_attrs(t))
        log(f"trial {t.number} ({t.user_attrs.get('experiment')}) was left running by a worker that died: run again")


def _retry_attrs(t) -> dict:
    """What the trial that runs an interrupted one's params again carries: which one it retries, and whether
    it is the baseline."""
    return {"retry_of": t.number, **({"baseline": True} if t.user_attrs.get("baseline") else {})}


def _stop_group(pgid: int, grace: float = 30.0) -> None:
    """Stop a trial's process group: SIGINT (dvc and Lightning stop cleanly), then SIGKILL after ``grace``."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def optuna_summary(sweep_name: str, spec: Sweep, url: str, source: str) -> list[dict]:
    """The rows of the study as it stands, running nothing."""
    import optuna

    try:
        study = optuna.load_study(study_name=sweep_name, storage=open_storage(url, f"{source}: storage"))
    except KeyError:
        raise PenwrightError(f"{source}: no trials yet in {url}: run `penwright sweep {sweep_name}` first") from None
    return optuna_rows(study, spec)


def open_study(sweep_name: str, spec: Sweep, url: str, source: str):
    """The sweep's Optuna study in its storage (created, or loaded to resume): the dead workers' trials reaped and
    queued again, then the baseline and the ``enqueue`` points queued where they have not been yet."""
    import optuna

    from penwright.core.trials import pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, f"{source}: storage")
    prune = spec.pruner.model_dump()
    study = optuna.create_study(
        study_name=sweep_name,
        storage=storage,
        direction=spec.direction,
        sampler=optuna.samplers.TPESampler(  # workers draw differently; multivariate: keys that act together
            seed=spec.seed + os.getpid(), n_startup_trials=spec.startup_trials, multivariate=True
        ),
        pruner=pruner(**prune),
        load_if_exists=True,
    )
    reap(study)
    if spec.baseline and not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(baseline_params(spec, source), user_attrs={"baseline": True})
    for point in spec.enqueue:  # (tried, queued or running already: not again)
        study.enqueue_trial(point, user_attrs={"enqueued": True}, skip_if_exists=True)
    return study


def run_optuna(sweep_name: str, spec: Sweep, metric: str, url: str, work: Path, source: str) -> list[dict]:
    import optuna

    from penwright.core.errors import ConfigError

    study = open_study(sweep_name, spec, url, source)
    prune = spec.pruner.model_dump()
    distributions = _distributions(spec)
    assert spec.trials is not None
    work.mkdir(parents=True, exist_ok=True)
    while True:
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        taken = sum(s in (*FINISHED, "RUNNING") for s in states)
        if taken >= spec.trials:
            break
        if states.count("FAIL") > 3 * spec.trials:  # every trial fails: say so rather than go on forever
            raise PenwrightError(
                f"{source}: {states.count('FAIL')} trials failed, {taken} finished: see the trials' logs in {work}/"
            )
        trial = study.ask(distributions)
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        if sum(t.state.name in (*FINISHED, "RUNNING") for t in ahead) >= spec.trials:  # another worker took the last
            trial.set_user_attr("skipped", "the sweep had its trials")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        experiment = f"{sweep_name}-{trial.number}"
        trial.set_user_attr("experiment", experiment)
        trial.set_user_attr("worker", _worker())
        shown = " ".join(override(k, v) for k, v in trial.params.items())
        done = sum(s in FINISHED for s in states)
        try:  # (composes the trial's config: a combination the schema refuses, n_embd not a multiple of n_head)
            overrides = trial_overrides(sweep_name, spec, trial.params)
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"trial {trial.number}: {shown}: not a valid config ({err}); next")
            continue
        log(
            f"trial {trial.number} ({done + 1} of {spec.trials}): {shown} -> dvc exp run {spec.stage} --name {experiment}"
        )
        started = time.monotonic()
        try:
            code = _dvc_exp_run(
                spec.stage,
                experiment,
                overrides,
                work / f"{experiment}.log",
                trial_env(url, sweep_name, trial._trial_id, prune, bounds(study, spec).get("wall_seconds")),
                trial,
            )
        except KeyboardInterrupt:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs=_retry_attrs(study.trials[trial.number]))
            log(f"stopped: trial {trial.number} runs again when the sweep is started again")
            raise
        if code != 0:
            trial.set_user_attr("error", f"dvc exp run exited {code}: see {work / f'{experiment}.log'}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"trial {trial.number} failed (exit {code}): see {work / f'{experiment}.log'}")
            continue
        values = _read_metrics(metric)
        for key in ("wall_seconds", "steps", "pruned_at_step"):
            if key in values:
                trial.set_user_attr(key, values[key])
        value = values.get(metric.rsplit(":", 1)[-1])
        if spec.limits:  # the limited metrics, and how far over each limit (<= 0: within) for TPE's constraints
            trial.set_user_attr("limited", {k: values.get(k) for k in spec.limits})
            for key, amount in zip(spec.limits, _amounts_over(spec, bounds(study, spec), values), strict=True):
                trial.set_constraint(key, amount)
        if values.get("pruned_at_step") is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            state = f"pruned at step {values['pruned_at_step']}"
        elif value is None or not math.isfinite(float(value)):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            state = f"no finite {metric}"
        else:
            study.tell(trial, float(value))
            state = f"{spec.metric} {value}"
        log(f"trial {trial.number}: {state} ({time.monotonic() - started:.0f} s)")
    return optuna_rows(study, spec)


def _dvc_exp_run(stage: str, experiment: str, overrides: list[str], log_file: Path, env: dict, trial) -> int:
    """``dvc exp run`` of one trial in this workspace, its output in ``log_file``, in a process group of its own
    (so a worker that was killed can have its training stopped by the next one: ``reap``); Ctrl-C stops it."""
    # -f: a sweep started anew (its storage deleted) numbers its trials from 0 again and replaces the experiments
    # of the same names; a resumed one never reuses a number
    cmd = ["dvc", "exp", "run", stage, "--name", experiment, "-f", *(a for o in overrides for a in ("-S", o))]
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
        trial.set_user_attr("pgid", proc.pid)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            _stop_group(proc.pid)
            raise


def _read_metrics(metric: str) -> dict:
    path = Path(metric.rsplit(":", 1)[0])
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def optuna_rows(study, spec: Sweep) -> list[dict]:
    rows, limit = [], bounds(study, spec)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.user_attrs.get("skipped"):
            continue
        state = t.state.name
        if state == "FAIL" and t.number in retried:
            continue  # interrupted and run again: its retry is its row
        value = t.value if state == "COMPLETE" else None
        rows.append(
            {
                "trial": t.number,
                "experiment": t.user_attrs.get("experiment"),
                "state": state.lower(),
                "value": value,
                "params": dict(t.params),
                "pruned_at_step": t.user_attrs.get("pruned_at_step"),
                "last_val_loss": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
                "wall_seconds": t.user_attrs.get("wall_seconds"),
                "error": t.user_attrs.get("error"),
                "over_limits": [
                    k
                    for k, amount in zip(spec.limits, _amounts_over(spec, limit, t.user_attrs["limited"]), strict=True)
                    if amount > 0
                ]
                if "limited" in t.user_attrs  # (a trial still running has no values yet)
                else [],
                "baseline": bool(t.user_attrs.get("baseline")),
            }
        )
    return rows


def bounds(study, spec: Sweep) -> dict[str, float | None]:
    """Each limit as a number: a multiple of the baseline trial's value ("1.03x"; None until the baseline has
    finished), or the number itself."""
    base = next(
        (t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline") and t.state.name == "COMPLETE"),
        None,
    )
    limited = base.user_attrs.get("limited", {}) if base is not None else {}
    out: dict[str, float | None] = {}
    for key, limit in spec.limits.items():
        if isinstance(limit, str):
            out[key] = float(limit[:-1]) * float(limited[key]) if limited.get(key) is not None else None
        else:
            out[key] = float(limit)
    return out


def _amounts_over(spec: Sweep, limit: dict[str, float | None], values: dict) -> list[float]:
    """How far over each limit a trial's values are (0 where the limit is not known yet)."""
    out = []
    for key in spec.limits:
        bound, value = limit.get(key), values.get(key)
        out.append(0.0 if bound is None else (math.inf if value is None else float(value)) - bound)
    return out


# -- grid (DVC's queue) ------------------------------------------------------------------------------------


def _exp_show() -> list[dict]:
    """Every experiment of the workspace's baseline: ``dvc exp show --json``, flattened to name, state, params
    (params.yaml) and metrics (every metrics file, merged)."""
    done = subprocess.run(["dvc", "exp", "show", "--json", "--no-fetch"], capture_output=True, text=True)
    if done.returncode != 0:
        raise PenwrightError(f"dvc exp show failed: {done.stderr.strip()[-300:]}")
    out = []
    for baseline in json.loads(done.stdout or "[]"):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = {}
                for file, m in (data.get("metrics") or {}).items():
                    metrics.update({f"{file}:{k}": v for k, v in (m.get("data") or {}).items()})
                out.append(
                    {
                        "name": rev.get("name"),
                        "state": data.get("status") or "Success",
                        "params": params,
                        "metrics": metrics,
                    }
                )
    return out


def _param_at(params: dict, key: str):
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_grid(sweep_name: str, spec: Sweep, metric: str, work: Path) -> list[dict]:
    combos = spec.combinations()
    names = [f"{sweep_name}-{k + 1}" for k in range(len(combos))]
    existing = {e["name"]: e for e in _exp_show() if e["name"]}
    root = Path.cwd().resolve()
    queued = 0
    for experiment, combo in zip(names, combos, strict=True):
        if experiment in existing and existing[experiment]["state"] in ("Success", "Queued", "Running"):
            continue
        overrides = trial_overrides(sweep_name, spec, combo)
        overrides.append(f"logger.save_dir={root}")  # queued runs are in temp copies: W&B's files land here
        cmd = [
            "dvc",
            "exp",
            "run",
            "--queue",
            spec.stage,
            "--name",
            experiment,
            *(a for o in overrides for a in ("-S", o)),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise PenwrightError(f"queueing {experiment} failed: {done.stderr.strip()[-400:]}")
        queued += 1
    log(
        f"{len(combos)} combinations: {queued} queued, {len(combos) - queued} done or queued before; dvc queue start -j {spec.jobs}"
    )
    subprocess.run(["dvc", "queue", "start", "-j", str(spec.jobs)], check=True, capture_output=True)
    while True:
        states = {e["name"]: e["state"] for e in _exp_show() if e["name"] in names}
        waiting = [n for n in names if states.get(n) in ("Queued", "Running")]
        if not waiting:
            break
        log(f"{len(names) - len(waiting)} of {len(names)} finished; waiting for {', '.join(waiting[:4])}")
        time.sleep(10)
    subprocess.run(["dvc", "queue", "stop"], capture_output=True)
    return grid_rows(sweep_name, spec, metric)


def grid_rows(sweep_name: str, spec: Sweep, metric: str) -> list[dict]:
    """A grid's rows, from its experiments as ``dvc exp show`` lists them."""
    combos = spec.combinations()
    names = [f"{sweep_name}-{k + 1}" for k in range(len(combos))]
    rows = []
    found = {e["name"]: e for e in _exp_show() if e["name"] in names}
    key = metric.rsplit(":", 1)[-1]
    for k, (experiment, combo) in enumerate(zip(names, combos, strict=True)):
        e = found.get(experiment)
        metrics, file = (e or {}).get("metrics", {}), metric.split(":", 1)[0]
        value = metrics.get(metric)
        ok = e is not None and e["state"] == "Success" and value is not None
        rows.append(
            {
                "trial": k + 1,
                "experiment": experiment,
                "state": "complete" if ok else ("failed" if e else "missing"),
                "value": value if ok else None,
                "params": combo,
                "pruned_at_step": None,
                "last_val_loss": None,
                "wall_seconds": (e or {}).get("metrics", {}).get(metric.rsplit(":", 1)[0] + ":wall_seconds"),
                "error": None if ok else f"no {key}: dvc queue logs {experiment}",
                "over_limits": [
                    k for k, v in spec.limits.items() if float(metrics.get(f"{file}:{k}", math.inf)) > float(v)
                ]
                if ok
                else [],
            }
        )
    return rows


# -- the summary --------------------------------------------------------------------------------------------


def ranked(rows: list[dict], direction: str) -> list[dict]:
    """Finished trials by the metric (best first), then pruned ones (by their last val loss), then the rest."""
    sign = 1 if direction == "minimize" else -1
    complete = sorted(
        (r for r in rows if r["state"] == "complete"), key=lambda r: (bool(r.get("over_limits")), sign * r["value"])
    )
    pruned = sorted((r for r in rows if r["state"] == "pruned"), key=lambda r: r["last_val_loss"] or math.inf)
    rest = [r for r in rows if r["state"] not in ("complete", "pruned")]
    return complete + pruned + rest


def write_summary(sweep_name: str, spec: Sweep, metric: str, rows: list[dict]) -> Path:
    """``reports/sweeps/<sweep>.md`` and ``.json``, and the same table on the terminal."""
    rows = ranked(rows, spec.direction)
    keys = list(spec.space)
    best = rows[0] if rows and rows[0]["state"] == "complete" and not rows[0].get("over_limits") else None
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "failed", "running")}
    header = ["trial", "experiment", spec.metric, "state", *keys, "wall s"]
    table = []
    for r in rows:
        state = r["state"] + (f" at step {r['pruned_at_step']}" if r.get("pruned_at_step") is not None else "")
        state += "".join(f", over {k}" for k in r.get("over_limits") or []) + (
            " (baseline)" if r.get("baseline") else ""
        )
        value = "" if r["value"] is None else f"{r['value']:.5g}"
        wall = "" if r.get("wall_seconds") is None else f"{float(r['wall_seconds']):.0f}"
        table.append(
            [
                str(r["trial"]),
                str(r["experiment"] or ""),
                value,
                state,
                *(_cell(r["params"].get(k)) for k in keys),
                wall,
            ]
        )
    lines = [
        f"# Sweep `{sweep_name}`",
        "",
        f"{spec.engine}, {spec.direction} `{metric}`"
        + "".join(f", {k} <= {v}" for k, v in spec.limits.items())
        + f"; {len(rows)} trials: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + ". `dvc exp show` lists them; each is `dvc exp apply <experiment>`-able.",
        "",
    ]
    if best:
        lines += [
            "Best: `" + best["experiment"] + "`, " + " ".join(f"`{override(k, v)}`" for k, v in best["params"].items()),
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    out = Path("reports/sweeps")
    report = atomic_write_text(out / f"{sweep_name}.md", "\n".join(lines) + "\n")
    summary = {
        "sweep": sweep_name,
        "engine": spec.engine,
        "metric": metric,
        "direction": spec.direction,
        "best": best,
        "trials": rows,
    }
    atomic_write_text(out / f"{sweep_name}.json", json.dumps(summary, indent=2) + "\n")
    _print_table(sweep_name, header, table, best)
    log(f"summary -> {report}")
    return report


def _cell(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_table(sweep_name: str, header: list[str], table: list[list[str]], best: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sweep {sweep_name}")
    for h in header:
        t.add_column(h)
    for cells in table:
        t.add_row(*cells)
    needed = sum(max(len(h), *(len(c[i]) for c in table)) + 3 for i, h in enumerate(header)) if table else 0
    console = Console(file=sys.stdout, width=max(needed + 1, shutil.get_terminal_size().columns))  # never squeezed
    console.print(t)
    if best:
        console.print(f"best: {best['experiment']}  " + " ".join(override(k, v) for k, v in best["params"].items()))
