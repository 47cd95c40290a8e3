"""Compose the config every stage runs on, and check it early.

Two sources, one result (a typed, frozen ``schema.Config``; a bad value is refused here, in one line):

* ``compose(overrides)`` composes ``conf/`` with Hydra, as ``penwright <stage> key=value`` does;
* ``compose(overrides, params="params.yaml")`` reads the file ``dvc exp run`` wrote from ``conf/``,
  as the stages in dvc.yaml do.

Neither changes the working directory or writes ``outputs/``: paths in the config are relative
to where the command runs (the repository root).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from penwright.core.errors import ConfigError
from penwright.core.schema import Config, validate

CONFIG_DIR = "conf"
CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"
HYDRA_VERSION_BASE = "1.3"


def find_config_dir(config_dir: str | Path | None = None) -> Path:
    """The ``conf/`` directory: the given one, else ``./conf``, else the one beside the installed source."""
    candidates = [Path(config_dir)] if config_dir else [Path.cwd() / CONFIG_DIR]
    if config_dir is None:
        candidates.append(Path(__file__).resolve().parents[3] / CONFIG_DIR)
    for cand in candidates:
        if (cand / f"{CONFIG_NAME}.yaml").is_file():
            return cand.resolve()
    raise ConfigError(
        f"no {CONFIG_NAME}.yaml in {candidates[0]}: run penwright from the repository root "
        f"(where conf/ is), or pass --config-dir"
    )


def compose(
    overrides: Sequence[str] = (),
    params: str | Path | None = None,
    config_dir: str | Path | None = None,
) -> Config:
    """Compose ``conf/`` (or load ``params``) with Hydra overrides applied, resolved, validated against the schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if params is not None:
        path = Path(params)
        if not path.is_file():
            raise ConfigError(
                f"{path}: no such params file. Write it with `penwright params` "
                f"(or `dvc exp run`, which composes conf/ into it)"
            )
        directory, name = path.resolve().parent, path.stem
    else:
        directory, name = find_config_dir(config_dir), CONFIG_NAME
    try:
        with initialize_config_dir(str(directory), version_base=HYDRA_VERSION_BASE):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
        values = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        source = path if params is not None else directory
        raise ConfigError(_explain(err, overrides, source)) from None
    except yaml.YAMLError as err:  # a damaged params.yaml or conf/ file
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        file = mark.name if mark is not None and mark.name and not mark.name.startswith("<") else None
        file = file or (path if params is not None else directory)
        fix = (
            "rewrite it with `penwright params`"
            if params is not None
            else "fix that line (git diff shows what changed)"
        )
        raise ConfigError(f"{file}: not valid YAML{where}: {str(err).splitlines()[0]}; {fix}") from None
    return validate(values, source=str(path) if params is not None else "")


def write_params(
    overrides: Sequence[str] = (), output: str | Path = PARAMS_FILE, config_dir: str | Path | None = None
) -> Path:
    """Compose ``conf/`` into ``params.yaml`` exactly as ``dvc exp run`` does (same function)."""
    from dvc.utils.hydra import compose_and_dump

    directory = find_config_dir(config_dir)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    compose_and_dump(tmp, str(directory), None, CONFIG_NAME, str(directory), list(overrides))
    tmp.replace(output)
    return output


def _all_keys(cfg: object, prefix: str = "") -> Iterable[str]:
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            full = f"{prefix}{key}"
            yield full
            yield from _all_keys(value, f"{full}.")


def _explain(err: Exception, overrides: Sequence[str], source: Path) -> str:
    """Hydra's or OmegaConf's error in one line, naming the key or group choice at fault; an unknown key
    comes with the known keys closest to it (and the group that holds them)."""
    import re

    text = str(err)
    unknown = re.findall(r"Could not override '([^']+)'", text)
    if unknown:
        return "; ".join(_unknown_key(key, source, overrides) for key in unknown)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, choice = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path", 1)[0], re.M)
        return f"{group}={choice}: no such file conf/{group}/{choice}.yaml (choices: {', '.join(options) or 'none'})"
    first = (getattr(err, "msg", None) or text or type(err).__name__).splitlines()[0]
    key = getattr(err, "full_key", None)
    if key:
        return f"{key}: {first.strip()}"
    if "override_grammar" in text or "no viable alternative" in text or "mismatched input" in text:
        return f"{first.strip()} in the overrides {list(overrides)}: write them as key=value (Hydra's override syntax)"
    return f"{source}: {first.strip()}"


def _unknown_key(key: str, source: Path, overrides: Sequence[str] = ()) -> str:
    """``key``: not a known key (of the groups chosen in ``overrides``), with the closest known keys."""
    choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0] and not o.startswith(("+", "~"))]
    message = f"{key}: not a known key" + (f" with {' '.join(choices)}" if choices else "")
    try:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        directory = source if source.is_dir() else source.parent
        name = CONFIG_NAME if source.is_dir() else source.stem
        with initialize_config_dir(str(directory), version_base=HYDRA_VERSION_BASE):
            base = OmegaConf.to_container(hydra_compose(config_name=name, overrides=choices), resolve=False)
    except Exception:  # the hint is a courtesy: never hide the real error behind a second one
        return message + "; `penwright show` prints every key"
    keys = [k for k in _all_keys(base) if k != key]
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    near += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in near]
    near += [
        k
        for k in difflib.get_close_matches(leaf, keys, n=6, cutoff=0.0)
        if difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio() > 0.7 and k not in near
    ]
    if not near:
        return message + "; `penwright show` prints every key"
    groups = sorted({k.split(".", 1)[0] for k in near})
    return (
        f"{message}. Did you mean: {', '.join(near[:4])} (group{'s' if len(groups) > 1 else ''} {', '.join(groups)})?"
    )
