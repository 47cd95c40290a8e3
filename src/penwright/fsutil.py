"""Writes that never leave half a file or half a directory: write beside the target, then rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_dir_for(out_dir: str | Path) -> Path:
    """An empty temp directory beside ``out_dir`` (same filesystem, so the final rename is atomic). Temp dirs
    that a killed run left beside it (their process is gone) are removed first."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if leftover.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A stage's output directory, built in a temp dir beside it: when the block ends normally the temp dir
    replaces ``out_dir`` in one rename; when it raises (or is interrupted) the temp dir is removed and
    ``out_dir`` is left exactly as it was. A kill leaves only a temp dir, which the next run removes."""
    tmp = temp_dir_for(out_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)


def replace_dir(tmp: str | Path, out_dir: str | Path) -> Path:
    """Put the finished ``tmp`` directory in place of ``out_dir`` (the old one is removed only after)."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
