"""Crashes and damaged checkpoints: ``kill -9`` during train, prepare and export, and a truncated last.ckpt.

Each stage runs for real in a child process (``python -m penwright.cli``), is killed with SIGKILL at a
chosen moment, then run again: the rerun finishes, and what it writes equals an uninterrupted run's
(training: bit-identical weights on CPU, every curve step once). Nothing the killed run touched is left
half-written.
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.paths import ENGLISH, REPO
from helpers.tiny import TINY_MODEL, TINY_TRAIN
from penwright.core.errors import PenwrightError

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def stage_cmd(stage: str, overrides: list[str], prelude: str = "") -> list[str]:
    """``penwright <stage> overrides`` in a child process; ``prelude`` runs first in it (fault injection)."""
    code = f"{prelude}\nimport sys\nfrom penwright.cli import main\nmain(sys.argv[1:])"
    return [sys.executable, "-c", code, stage, *overrides]


def kill_when(cmd: list[str], ready, timeout: float = 120.0) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true. Fails if it ends before that moment came."""
    child = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        if child.poll() is not None:
            raise AssertionError(f"the run ended (rc {child.returncode}) before the kill point:\n{child.stderr.read()}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("the kill point never came")
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


def run_stage(stage: str, overrides: list[str]) -> None:
    done = subprocess.run(stage_cmd(stage, overrides), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def curve_steps(reports: Path) -> list[int]:
    with open(reports / "curves" / "train.tsv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")]


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = model_weights(a), model_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train_overrides(prepared: Path, run: Path, *extra: str, model: list[str] = TINY_MODEL) -> list[str]:
    return [
        f"data.out_dir={prepared}",
        f"train.ckpt_dir={run}/ckpt",
        f"train.out_dir={run}/model",
        f"paths.reports={run}/reports",
        *model,
        *TINY_TRAIN,
        "sample.every_n_steps=0",
        *extra,
    ]


# -- train ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_kill_during_training_after_a_periodic_checkpoint_then_rerun_equals_an_uninterrupted_run(
    tmp_path, prepared_tiny, tiny_gpt2, method
):
    steps = ["trainer.max_steps=40", "train.decay_steps=40"]
    model = TINY_MODEL  # LoRA: on the tiny pretrained model
    if method == "lora":
        model = ["model=gpt2", f"model.name_or_path={tiny_gpt2}", "train.lora.enabled=true", "train.lora.rank=4"]
    run_stage("train", train_overrides(prepared_tiny, tmp_path / "straight", *steps, model=model))
    crashed = tmp_path / "crashed"
    kill_when(
        stage_cmd("train", train_overrides(prepared_tiny, crashed, *steps, model=model)),
        lambda: any((crashed / "ckpt").glob("step-*.ckpt")),
    )
    assert not (crashed / "model").exists()  # killed before the end: no half-written model
    run_stage("train", train_overrides(prepared_tiny, crashed, *steps, model=model))
    assert same_weights(tmp_path / "straight" / "model", crashed / "model")
    assert curve_steps(crashed / "reports") == list(range(1, 41))  # every step once
    assert not list((crashed / "ckpt").glob(".*.tmp-*"))


# The child's torch.save writes a checkpoint's temp file, then (at the second write of last.ckpt, step 8)
# waits to be killed there, before the rename: the moment a crash leaves a checkpoint half-done.
STALL_IN_CHECKPOINT_WRITE = """
import os, time, torch
_save, _calls = torch.save, [0]
def _stalling_save(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    if ".last.ckpt.tmp-" in str(f):
        _calls[0] += 1
        if _calls[0] == 2:
            open(os.environ["STALL_MARK"], "w").close()
            time.sleep(600)
torch.save = _stalling_save
"""


@pytest.mark.slow
def test_kill_in_the_middle_of_a_checkpoint_write_then_rerun_equals_an_uninterrupted_run(
    tmp_path, prepared_tiny, monkeypatch
):
    steps = ["trainer.max_steps=16", "train.decay_steps=16"]
    run_stage("train", train_overrides(prepared_tiny, tmp_path / "straight", *steps))
    crashed, mark = tmp_path / "crashed", tmp_path / "stalled"
    monkeypatch.setitem(ENV, "STALL_MARK", str(mark))
    kill_when(
        stage_cmd("train", train_overrides(prepared_tiny, crashed, *steps), STALL_IN_CHECKPOINT_WRITE), mark.exists
    )
    left = list((crashed / "ckpt").glob(".*.tmp-*"))
    assert left, "the kill came before the temp file of the checkpoint was written"
    last = torch.load(crashed / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)  # still whole
    assert last["global_step"] == 4
    run_stage("train", train_overrides(prepared_tiny, crashed, *steps))
    assert same_weights(tmp_path / "straight" / "model", crashed / "model")
    assert curve_steps(crashed / "reports") == list(range(1, 17))
    assert not list((crashed / "ckpt").glob(".*.tmp-*"))  # the rerun removed what the kill left


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_last_checkpoint_resumes_from_the_newest_intact_periodic_one(compose_train, tmp_path, capsys):
    from penwright.train.stage import train

    steps = ["train.decay_steps=12", "train.ckpt_every_n_steps=4"]
    train(compose_train("trainer.max_steps=12", *steps, run="straight"))
    train(compose_train("trainer.max_steps=6", *steps, run="chunked"))  # step-000004.ckpt, last.ckpt at step 6
    ckpt = tmp_path / "chunked" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == ["best.ckpt", "last.ckpt", "step-000004.ckpt"]
    _truncate(ckpt / "last.ckpt")  # a full disk, a bad copy
    capsys.readouterr()
    metrics = train(compose_train("trainer.max_steps=12", *steps, run="chunked"))
    said = capsys.readouterr().err
    assert f"[train] {ckpt / 'last.ckpt'} is damaged" in said and "resuming from step-000004.ckpt" in said
    assert metrics["resumed"] is True and metrics["steps"] == 12
    assert same_weights(tmp_path / "straight" / "model", tmp_path / "chunked" / "model")
    assert curve_steps(tmp_path / "chunked" / "reports") == list(range(1, 13))  # steps 5, 6 once, not twice


def test_a_damaged_last_checkpoint_with_no_intact_periodic_one_is_one_line(compose_train, tmp_path):
    from penwright.train.stage import train

    train(compose_train("trainer.max_steps=4"))
    ckpt = tmp_path / "run" / "ckpt"
    for path in ckpt.glob("*.ckpt"):
        if path.name != "best.ckpt":
            path.write_bytes(b"\0" * 100 if path.name == "last.ckpt" else path.read_bytes()[:1000])
    before = digest_tree(ckpt)
    with pytest.raises(PenwrightError) as err:
        train(compose_train("trainer.max_steps=8"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{ckpt / 'last.ckpt'}: damaged")
    assert "train.resume=false" in message
    assert digest_tree(ckpt) == before  # nothing deleted: the user decides


def test_checksums_catch_changed_bytes_not_only_truncation(compose_train, tmp_path):
    from penwright.train.stage import damaged, train

    train(compose_train("trainer.max_steps=4"))
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert damaged(last) is None
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    last.write_bytes(bytes(data))
    assert damaged(last) is not None


# -- prepare and export --------------------------------------------------------------------------------


def _corpus(root: Path, files: int = 200) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(files):
        (corpus / f"{i:03d}.txt").write_text(f"Chapter {i}.\n" + ENGLISH * 40)
    return corpus


@pytest.mark.slow
def test_kill_during_prepare_leaves_the_earlier_output_and_a_rerun_equals_an_uninterrupted_run(tmp_path):
    corpus = _corpus(tmp_path)
    common = [f"data.path={corpus}", "model.tokenizer.vocab_size=300", "data.fast_encode=false"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_stage("prepare", [*common, f"data.out_dir={straight}"])
    run_stage("prepare", [*common, f"data.out_dir={crashed}", "data.val_fraction=0.5"])  # an earlier output
    earlier = digest_tree(crashed)
    kill_when(
        stage_cmd("prepare", [*common, f"data.out_dir={crashed}"]),
        lambda: any(p.name.startswith(".crashed.tmp-") and (p / "tokenizer").exists() for p in tmp_path.iterdir()),
    )
    assert digest_tree(crashed) == earlier  # the killed run never touched it
    run_stage("prepare", [*common, f"data.out_dir={crashed}"])
    assert digest_tree(crashed) == digest_tree(straight)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".crashed")] == []  # its temp dir is gone


@pytest.mark.slow
def test_kill_during_export_leaves_the_earlier_export_and_a_rerun_equals_an_uninterrupted_run(tmp_path, tiny_gpt2):
    common = [f"train.out_dir={tiny_gpt2}", f"paths.reports={tmp_path / 'reports'}", "export.gguf=[]"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_stage("export", [*common, f"export.out_dir={straight}"])
    run_stage("export", [*common, f"export.out_dir={crashed}", "export.graph=lean"])  # an earlier export
    earlier = digest_tree(crashed)
    kill_when(
        stage_cmd("export", [*common, f"export.out_dir={crashed}"]),
        lambda: any(p.name.startswith(".crashed.tmp-") and (p / "model.onnx").exists() for p in tmp_path.iterdir()),
    )
    assert digest_tree(crashed) == earlier
    run_stage("export", [*common, f"export.out_dir={crashed}"])
    assert digest_tree(crashed) == digest_tree(straight)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".crashed")] == []


def test_a_missing_last_checkpoint_resumes_from_the_periodic_one(compose_train, tmp_path, capsys):
    """A kill during the first write of last.ckpt leaves the periodic checkpoint before it: resume from it."""
    from penwright.train.stage import train

    steps = ["train.decay_steps=12", "train.ckpt_every_n_steps=4"]
    train(compose_train("trainer.max_steps=12", *steps, run="straight"))
    train(compose_train("trainer.max_steps=6", *steps, run="chunked"))
    (tmp_path / "chunked" / "ckpt" / "last.ckpt").unlink()
    capsys.readouterr()
    metrics = train(compose_train("trainer.max_steps=12", *steps, run="chunked"))
    assert "last.ckpt is missing: resuming from step-000004.ckpt" in capsys.readouterr().err
    assert metrics["resumed"] is True
    assert same_weights(tmp_path / "straight" / "model", tmp_path / "chunked" / "model")


def test_leftovers_of_a_killed_run_are_cleaned_and_nothing_else(tmp_path):
    from penwright.core.atomic import _HOST, staged_dir

    out = tmp_path / "model"
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (tmp_path / f".model.tmp-{_HOST}-{dead}").mkdir()  # a temp dir of a killed run
    (tmp_path / f".model.old-{_HOST}-{dead}").mkdir()  # killed between replace_dir's two renames:
    (tmp_path / f".model.old-{_HOST}-{dead}" / "weights").write_text("the earlier output")  # out is missing
    (tmp_path / ".model.backup-20240101").mkdir()  # the user's own: never touched
    (tmp_path / f".model.tmp-otherhost-{dead}").mkdir()  # another machine's (shared disk): never touched
    with staged_dir(out) as tmp:
        assert (out / "weights").read_text() == "the earlier output"  # put back before anything else
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", ".model.backup-20240101", f".model.tmp-otherhost-{dead}"]
    )
