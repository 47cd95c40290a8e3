"""One logger for every stage: ``[stage] message`` lines on stderr, from global rank zero only.

``log = get_logger("train")`` then ``log.info(...)``. In a multi-process run (DDP, SLURM) the other
ranks stay quiet, as Lightning's own ``rank_zero_info`` does, so a message prints once.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "penwright"


def global_rank() -> int:
    """This process's global rank: Lightning's once it is set, else the launcher's environment."""
    lightning = sys.modules.get("lightning.pytorch.utilities.rank_zero")
    rank = getattr(getattr(lightning, "rank_zero_only", None), "rank", None)
    if rank is not None:
        return int(rank)
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    return int(local if local.isdigit() else 0) + (1 if node.isdigit() and int(node) > 0 else 0)  # 0 only on node 0


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is now (pytest and tqdm replace it), flushing each line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must never crash a stage
            self.handleError(record)


class _StageFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.removeprefix(ROOT + ".") if record.name != ROOT else ROOT
        return f"[{stage}] {record.getMessage()}"


def _setup() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_StageFormat())
        handler.addFilter(lambda record: global_rank() == 0)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # not through the root logger: each line prints once
    return root


def get_logger(stage: str) -> logging.Logger:
    """The logger of ``stage`` (``prepare``, ``train``, ...): ``[stage] message`` on rank zero's stderr."""
    _setup()
    return logging.getLogger(f"{ROOT}.{stage}")
