"""A sweep's file (``conf/sweep/<name>.yaml``) and every check that runs before its first trial.

A sweep names a search space over config keys, the metric to optimize (a key of a metrics file the
pipeline writes, e.g. ``best_val_bpb`` of ``reports/train.json``), its direction, how many trials, and the
overrides every trial shares (the budget: ``trainer.max_steps=...``). ``load`` reads and types the file;
``check`` refuses, in one line naming the key, a space over an unknown key or a value the schema refuses,
a metric no stage writes, and a storage that cannot be reached, all before anything runs.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from penwright.core.errors import ConfigError

SWEEP_DIR = Path("conf/sweep")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Param(_Strict):
    """One dimension: a range (``low``, ``high``; ``log`` spacing; ``step`` for a grid of it) or ``choices``."""

    low: int | float | None = None  # whole numbers (low: 2) suggest whole numbers; 0.0 suggests any number
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high (a range) or choices (a list), not both or neither")
        if self.choices is not None and not self.choices:
            raise ValueError("choices is empty")
        if self.low is not None and self.high is not None:
            if self.low >= self.high:
                raise ValueError(f"low={self.low} must be below high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"log=true needs low > 0 (low={self.low})")
        return self

    @property
    def integer(self) -> bool:
        """A range over whole numbers (written ``low: 2, high: 6``) suggests whole numbers."""
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool) for v in self.ends())

    def ends(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def refuses(self, value) -> str | None:
        """Why this dimension cannot take ``value`` (None when it can): not one of the choices (of the same type:
        ``true`` is not ``1``), not a number, not whole on a whole-number range, outside the range, off its step."""
        if self.choices is not None:
            same = any(type(c) is type(value) and c == value for c in self.choices)
            return None if same else f"not one of space's choices {self.choices}"
        assert self.low is not None and self.high is not None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"not a number (space: {self.low}..{self.high})"
        if self.integer and not isinstance(value, int):
            return f"not a whole number (space: {self.low}..{self.high})"
        if not self.low <= value <= self.high:
            return f"outside space's {self.low}..{self.high}"
        if self.step is not None and abs((value - self.low) / self.step - round((value - self.low) / self.step)) > 1e-8:
            return f"not on space's grid ({self.low}..{self.high} by {self.step})"
        return None

    def grid(self) -> list:
        """Every value a grid tries: the choices, or low..high by ``step``."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ValueError("a grid over a range needs step (or give choices)")
        assert self.low is not None and self.high is not None
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) if self.integer else round(v, 12) for v in values]


class Pruner(_Strict):
    """Optuna's pruner: stop a trial whose val loss at an evaluation is worse than the median of the trials
    that reached that step (``median``), or never (``none``)."""

    kind: Literal["median", "none"] = "median"
    startup_trials: Annotated[int, Field(ge=0)] = 2  # trials that always run to the end, to compare against
    warmup_steps: Annotated[int, Field(ge=0)] = 0  # no pruning before this step of a trial


class Sweep(_Strict):
    """A sweep file, typed (see conf/sweep/*.yaml for the comments on each key)."""

    engine: Literal["optuna", "grid"] = "optuna"
    metric: str
    direction: Literal["minimize", "maximize"] = "minimize"
    trials: Annotated[int, Field(ge=1, le=100_000)] | None = None  # optuna: trials in all, every worker together
    jobs: Annotated[int, Field(ge=1, le=64)] = 1  # grid: experiments run at once by DVC's queue
    stage: str = "train"  # what `dvc exp run <stage>` runs for each trial (with what it depends on)
    storage: str | None = None  # optuna: a database URL or a journal file; null: artifacts/sweeps/<name>/journal.log
    seed: Annotated[int, Field(ge=0)] = 0  # the sampler's seed
    startup_trials: Annotated[int, Field(ge=0)] = 10  # optuna: random trials before TPE models the space
    overrides: list[str] = []  # every trial: key=value, the budget among them (trainer.max_steps=...)
    space: dict[str, Param]
    pruner: Pruner = Pruner()
    # optuna: the first trial is the config as it is (the space's keys at their values without the sweep)
    baseline: bool = False
    # upper bounds on other metrics of the same file: a number (wall_seconds: 350), or with baseline, a multiple of
    # the baseline trial's ("1.03x"); a trial over one is ranked after every trial within them, and Optuna's
    # sampler learns to keep within them (TPE's constraints)
    limits: dict[str, float | str] = {}
    # optuna: points to try first (after the baseline), each {space key: value} (keys left out are drawn): what
    # earlier runs or a hunch say is good; a point already tried is not queued again when the sweep resumes
    enqueue: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _engine_needs(self) -> Sweep:
        if not self.space:
            raise ValueError("space is empty: name at least one key to vary")
        if self.engine == "optuna" and self.trials is None:
            raise ValueError("engine optuna needs trials (how many, every worker together)")
        if self.engine == "grid":
            for key, param in self.space.items():
                if param.choices is None and param.step is None:
                    raise ValueError(f"space.{key}: a grid over a range needs step (or give choices)")
        for key, limit in self.limits.items():
            if isinstance(limit, str) and (not re.fullmatch(r"\d+(\.\d+)?x", limit) or not self.baseline):
                raise ValueError(
                    f"limits.{key}={limit!r}: a number, or a multiple of the baseline's (1.03x, with baseline: true)"
                )
        if self.baseline and self.engine != "optuna":
            raise ValueError("baseline: true is for engine optuna (a grid lists its combinations)")
        if self.enqueue and self.engine != "optuna":
            raise ValueError("enqueue is for engine optuna (a grid runs every combination anyway)")
        if self.trials is not None and self.trials < len(self.enqueue) + self.baseline:
            raise ValueError(
                f"trials={self.trials} leaves no room for the baseline and the {len(self.enqueue)} enqueued points: "
                f"give at least {len(self.enqueue) + self.baseline}"
            )
        for i, point in enumerate(self.enqueue):
            for key, value in point.items():
                if key not in self.space:
                    raise ValueError(f"enqueue[{i}].{key}: not a key of space ({', '.join(self.space)})")
                if reason := self.space[key].refuses(value):
                    raise ValueError(f"enqueue[{i}].{key}={value!r}: {reason}")
        for override in self.overrides:
            if "=" not in override:
                raise ValueError(f"overrides: {override!r} is not key=value")
        return self

    def combinations(self) -> list[dict[str, Any]]:
        """A grid's every combination, in the order of the file (the last key varies fastest)."""
        keys = list(self.space)
        return [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*(self.space[k].grid() for k in keys))
        ]


def path_of(name: str) -> Path:
    """``conf/sweep/<name>.yaml`` for a name, or the file itself for a path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return SWEEP_DIR / f"{name}.yaml"


def load(name: str) -> tuple[str, Sweep]:
    """(the sweep's name, its typed contents), or one line naming the file and the key at fault."""
    path = path_of(name)
    if not path.is_file():
        known = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")) if SWEEP_DIR.is_dir() else []
        raise ConfigError(f"{path}: no such sweep file (sweeps in {SWEEP_DIR}/: {', '.join(known) or 'none'})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep is a mapping of keys (engine, metric, space, ...)")
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        raise ConfigError(f"{path}: {where + ': ' if where else ''}{e['msg'].removeprefix('Value error, ')}") from None
    return path.stem, sweep


# -- checks before the first trial ---------------------------------------------------------------------


def check_space(sweep: Sweep, source: str) -> None:
    """Every key of the space is a config key, and every end of its range (every choice) is a value the schema
    takes: each is composed with the sweep's overrides, as a trial will be."""
    from penwright.core import config

    config.compose(sweep.overrides)  # the shared overrides alone first: their error is theirs
    for key, param in sweep.space.items():
        if key in {o.split("=", 1)[0].lstrip("+~") for o in sweep.overrides}:
            raise ConfigError(f"{source}: space.{key}: also set in overrides; a key is either varied or fixed")
        for value in param.ends():
            try:
                config.compose([*sweep.overrides, f"{key}={_override_value(value)}"])
            except ConfigError as err:
                raise ConfigError(f"{source}: space.{key}: {err}") from None


def _override_value(value) -> str:
    """A value as Hydra's override grammar reads it back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def override(key: str, value) -> str:
    """``key=value`` for ``dvc exp run -S`` and Hydra."""
    return f"{key}={_override_value(value)}"


def metric_file(metric: str, stage: str, source: str) -> str:
    """``file:key`` of ``metric`` among the metrics files ``stage`` declares in dvc.yaml (as ``dvc metrics show``
    reads them): a stage that does not exist, or a metric it does not write, is refused with what exists."""
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            stages = repo.stage.collect(stage)
            files = [out.def_path for s in stages for out in s.metrics]
    except Exception as err:  # not a DVC project, no such stage, a broken dvc.yaml
        raise ConfigError(f"{source}: stage={stage!r}: {' '.join(str(err).split())[:200]}") from None
    found: dict[str, Any] = {}
    for file in files:
        values = _written(file)
        found.update({f"{file}:{k}": v for k, v in _flat(values).items()})
    keys = [k for k in found if k == metric or k.split(":", 1)[1] == metric]
    if len(keys) == 1:
        return keys[0]
    if not keys:
        known = sorted(
            {k.split(":", 1)[1] for k in found if isinstance(found[k], (int, float)) and not isinstance(found[k], bool)}
        )
        hint = f"it writes {', '.join(known)}" if known else f"none written yet: run `dvc repro {stage}` once first"
        raise ConfigError(f"{source}: metric={metric!r}: stage {stage!r} writes no such metric ({hint})")
    raise ConfigError(f"{source}: metric={metric!r}: in several files ({', '.join(keys)}); write it as file:key")


def _written(file: str) -> dict:
    """A metrics file's values: the workspace's, else the committed one (a trial stopped mid-run leaves none)."""
    import subprocess

    path = Path(file)
    text = path.read_text() if path.is_file() else None
    if text is None:
        shown = subprocess.run(["git", "show", f"HEAD:{file}"], capture_output=True, text=True)
        text = shown.stdout if shown.returncode == 0 else ""
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return {}
    return values if isinstance(values, dict) else {}


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
