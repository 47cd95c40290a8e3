"""Real git + DVC projects in temp dirs, and running commands in them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` (output captured, a fixed git identity); raise with its output when it fails and ``check``."""
    # not WANDB_SERVICE: a W&B run earlier in this pytest process set it, and a child would log through
    # that process's service instead of its own
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env = {
        **inherited,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def new_project(tmp: Path, repo: Path, with_pipeline: bool) -> Path:
    """A fresh git + DVC project holding the repo's DVC files (and, optionally, its pipeline)."""
    proj = tmp / "proj"
    proj.mkdir()
    run(["git", "init", "-q"], proj)
    run(["dvc", "init", "-q"], proj)
    run(["dvc", "config", "core.analytics", "false"], proj)
    run(["dvc", "remote", "add", "-d", "local", str(tmp / "remote")], proj)
    shutil.copy(repo / "data.dvc", proj / "data.dvc")
    if with_pipeline:
        run(["dvc", "config", "hydra.enabled", "true"], proj)
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copy(repo / name, proj / name)
        shutil.copytree(repo / "conf", proj / "conf")
        shutil.copytree(repo / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        (proj / ".gitignore").write_text("/data\n/artifacts\n/models\n")
    return proj
