"""The code passes the linter and the formatter configured in pyproject.toml (what `pytest` checks in CI)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from helpers.paths import REPO


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(REPO / ".venv" / "bin")) or shutil.which("ruff")
    command = [exe] if exe else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
    done = ruff(*args)
    assert done.returncode == 0, (
        f"`ruff {' '.join(args)}` fails (fix: `ruff check --fix . && ruff format .`):\n{done.stdout}{done.stderr}"
    )
