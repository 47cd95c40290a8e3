"""Writes that never leave half a file or half a directory: write beside the target, then rename."""

from __future__ import annotations

import os
import re
import shutil
import socket
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


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"  # temp names say whose they are


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out_dir: Path) -> list[tuple[Path, str]]:
    """``(path, kind)`` of the temp dirs (``.<name>.tmp-<host>-<pid>``) and old copies (``.<name>.old-...``)
    that a killed run of this host left beside ``out_dir``: their process is gone."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|old)-{re.escape(_HOST)}-(\d+)")
    found = []
    for path in out_dir.parent.iterdir() if out_dir.parent.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _alive(int(match.group(2))):
            found.append((path, match.group(1)))
    return found


def temp_dir_for(out_dir: str | Path) -> Path:
    """An empty temp directory beside ``out_dir`` (same filesystem, so the final rename is atomic). What a
    killed run of this host left beside it is cleaned up first: its temp dir is removed; the earlier output it
    had moved aside, if it was killed between the two renames of ``replace_dir``, is put back."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover, kind in _leftovers(out_dir):
        if kind == "old" and not out_dir.exists():
            leftover.rename(out_dir)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{_HOST}-{os.getpid()}"
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
    old = out_dir.parent / f".{out_dir.name}.old-{_HOST}-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
