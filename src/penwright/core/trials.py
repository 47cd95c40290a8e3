"""What a sweep and its trials share: Optuna's storage and pruner, and how a trial's training finds its trial.

``penwright sweep`` runs each trial as ``dvc exp run`` with ``PENWRIGHT_TRIAL`` set (the storage URL, the
study, the trial's id and the pruner); the train stage reads it (``trial_from_env``) to report each val loss
to that trial and to stop when Optuna's pruner says the trial is hopeless. Outside a sweep it is unset and
training is as always. The storage URL is not a param: it may hold a password, and it changes no result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from penwright.core.errors import PenwrightError

ENV = "PENWRIGHT_TRIAL"


def open_storage(url: str, source: str = "storage"):
    """Optuna's storage for ``url``: a database URL (``sqlite:///...``, ``postgresql://...``) or a journal
    file (a path; Optuna's file journal, safe for several processes and for several machines on a shared disk
    that supports file locks). One that cannot be reached or written is refused in one line."""
    import optuna

    try:
        if "://" in url:
            return optuna.storages.RDBStorage(url)
        path = Path(url)
        if not path.parent.is_dir():
            raise OSError(f"no such directory {path.parent}")
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        storage.get_all_studies()  # reads the file: a damaged or unreadable one fails here
        return storage
    except Exception as err:  # drivers raise their own types (sqlalchemy, psycopg, OSError)
        why = " ".join(str(err).split())[:200]
        raise PenwrightError(
            f"{source}: {url!r} cannot be reached: {type(err).__name__}: {why}. Check the URL (a database URL, "
            f"or a journal file on a disk every worker mounts) and that the database is up"
        ) from None


def pruner(kind: str, startup_trials: int, warmup_steps: int):
    """Optuna's pruner: ``median`` stops a trial whose val loss at a step is worse than the median of the trials
    that reported that step (after ``startup_trials`` complete trials, from ``warmup_steps`` on); ``none`` never."""
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)


def trial_env(storage: str, study: str, trial_id: int, prune: dict, stop_after: float | None = None) -> dict[str, str]:
    """The environment a trial's ``dvc exp run`` gets (``stop_after``: seconds of training after which the trial
    is over the sweep's time limit and stops)."""
    info = {"storage": storage, "study": study, "trial_id": trial_id, "pruner": prune, "stop_after": stop_after}
    return {ENV: json.dumps(info)}


def trial_from_env():
    """(the Optuna trial this process trains for, seconds of training it may take or None), from
    ``PENWRIGHT_TRIAL``; None outside a sweep."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    import optuna

    info = json.loads(spec)
    study = optuna.load_study(
        study_name=info["study"], storage=open_storage(info["storage"], ENV), pruner=pruner(**info["pruner"])
    )
    return optuna.trial.Trial(study, int(info["trial_id"])), info.get("stop_after")
