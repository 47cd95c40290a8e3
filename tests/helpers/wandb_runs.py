"""Reading offline W&B runs from their files (the module is not named ``wandb`` so it never shadows the package)."""

from __future__ import annotations

from pathlib import Path


def wandb_run_of(run_dir: Path) -> str:
    """The run id in an offline run's directory name: offline-run-<date>_<time>-<id>[-<n> when two start in one second]."""
    import re

    return re.fullmatch(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)(-\d+)?", run_dir.name).group(1)


def wandb_record(run_dir: Path, needle: bytes, timeout: float = 30.0) -> bytes:
    """The offline run's protobuf log, once W&B's writer process (a separate process) has written ``needle``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        record = b"".join(p.read_bytes() for p in run_dir.glob("run-*.wandb"))
        if needle in record or time.monotonic() > deadline:
            return record
        time.sleep(0.2)
