"""The code passes the linter, the formatter and the type checker configured in pyproject.toml (what `pytest` checks
in CI), and pre-commit runs the same checks."""

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


def test_types():
    """`mypy` (configured in pyproject.toml: src/penwright, the big ML libraries read as Any) finds no error."""
    exe = shutil.which("mypy", path=str(REPO / ".venv" / "bin")) or shutil.which("mypy")
    command = [exe] if exe else [sys.executable, "-m", "mypy"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"`mypy` finds type errors in src/:\n{done.stdout}{done.stderr}"


def test_pre_commit_runs_the_suites_checks():
    """The pre-commit hooks run ruff check, ruff format --check and mypy: what this file runs."""
    import yaml

    hooks = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    entries = {h["entry"].split(" --force-exclude")[0] for h in hooks}
    assert entries == {"ruff check", "ruff format --check", "mypy"}
