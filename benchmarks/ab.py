"""What the A/B scripts share (engine_ab.py, serve_ab.py): a commit checked out beside the working tree, the
rounds' medians and ratios, and the report."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def base_tree(rev: str) -> Iterator[tuple[Path, Path]]:
    """``rev`` checked out in a temporary ``git worktree``: (its root, a scratch folder beside it)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
        try:
            yield tree, Path(tmp)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


def order(round_: int) -> tuple[str, str]:
    """Who goes first in a round: base and head alternate."""
    return ("base", "head") if round_ % 2 == 0 else ("head", "base")


def summary(runs: dict[str, list[float]]) -> dict:
    """Medians of each side's tokens/s over the rounds, and the median of the per-round ratios (head / base)."""
    ratios = [h / b for h, b in zip(runs["head"], runs["base"])]
    return {
        "base_tokens_per_sec": round(float(np.median(runs["base"])), 1),
        "head_tokens_per_sec": round(float(np.median(runs["head"])), 1),
        "head_over_base_median_ratio": round(float(np.median(ratios)), 3),
        "ratios_each_round": [round(x, 3) for x in ratios],
    }


def report(base: str, doc: str, output: str | None, **fields) -> None:
    """Print the report (and write it to ``output``): the two commits, how it was measured (the script's
    docstring's third paragraph) and ``fields``."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out = {"base": base, "head": head.stdout.strip() + " (working tree)", **fields}
    out["measured"] = doc.split("\n\n")[2].replace("\n", " ")
    text = json.dumps(out, indent=2) + "\n"
    if output:
        Path(output).write_text(text)
    print(text)
