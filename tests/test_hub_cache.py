"""A model or tokenizer loaded by hub name from the Hugging Face cache, where a cached file is damaged
(an interrupted download, a full disk): one line naming the cached file and what to do, not a traceback.

The cache is a real one in the layout ``huggingface_hub`` reads (``models--org--name/refs/main`` and
``snapshots/<commit>/``), filled with the tiny test model and read offline in a fresh process
(``HF_HUB_CACHE`` is read when the library is imported).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NAME = "penwright-test/tiny-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOAD = """
import sys
from transformers import AutoTokenizer, GPT2LMHeadModel
from penwright.core.errors import PenwrightError
from penwright.core.hub import load_pretrained
loader = GPT2LMHeadModel.from_pretrained if sys.argv[1] == "model" else AutoTokenizer.from_pretrained
try:
    loaded = load_pretrained(sys.argv[2], loader, sys.argv[1], "model.name_or_path")
except PenwrightError as err:
    print("error:", err)
    sys.exit(1)
print("loaded", type(loaded).__name__)
"""


def _cache(tmp_path: Path, tiny_gpt2: Path) -> tuple[Path, Path]:
    hub = tmp_path / "hub"
    repo = hub / ("models--" + NAME.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_gpt2, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return hub, snapshot


def _load(hub: Path, what: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", LOAD, what, NAME], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    ("what", "file", "cut"),
    [("model", "model.safetensors", 0.5), ("model", "config.json", 0.5), ("tokenizer", "tokenizer.json", 0.3)],
)
def test_a_damaged_file_in_the_hub_cache_is_named_in_one_line(tmp_path, tiny_gpt2, what, file, cut):
    hub, snapshot = _cache(tmp_path, tiny_gpt2)
    done = _load(hub, what)
    assert done.returncode == 0 and done.stdout.startswith("loaded"), done.stderr[-2000:]  # the cache works

    damaged = snapshot / file
    data = damaged.read_bytes()
    damaged.write_bytes(data[: int(len(data) * cut)])
    done = _load(hub, what)
    assert done.returncode == 1, done.stderr[-2000:]
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith(f"error: {damaged}: damaged or truncated (")
    assert f"delete the cached copy ({snapshot.parent.parent})" in line and "model.name_or_path" in line
    assert "Traceback" not in done.stderr
