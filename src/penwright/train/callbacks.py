"""The Lightning callbacks of the train stage, each built by name in ``Callbacks``.

* ``AtomicCheckpointIO``: checkpoints are written beside their name and renamed (never half a file);
* ``checkpoints``: the periodic checkpoint (``step-NNNNNN.ckpt``), ``last.ckpt`` and ``best.ckpt``, whose
  names stay fixed across resumes (no ``-vN`` copies);
* ``Throughput``: ``tokens_per_sec`` of the training steps alone;
* ``CurveWriter``: ``reports/curves/{train,val}.tsv`` for ``dvc plots``;
* ``SampleCallback``: text samples while training. Text samples while training: every ``sample.every_n_steps`` steps and at the end, on rank 0 only.

  Each time: the configured prompts, unconditional samples (from ``<|endoftext|>``) and random
  prompts cut from the validation text, at each temperature, with the model's KV cache in eval
  mode. They go to a NEW W&B table under one key (``samples``) and to
  ``reports/samples/step-NNNNNN.md``. Sampling runs under its own seed inside ``torch.random.fork_rng``,
  so the training RNG (dropout) is untouched: losses are the same with sampling on or off."""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from penwright.core import schema
from penwright.core.atomic import atomic_write_text
from penwright.core.copy_index import CopyIndex, CopyMeasures, copy_measures
from penwright.core.log import get_logger
from penwright.prepare.tokenizer import left_padded

log = get_logger("samples").info


@dataclass
class Callbacks:
    """Every callback of a training run, by name; ``all()`` is the order Lightning runs them in
    (``throughput`` first: the time of the others is not counted)."""

    throughput: Throughput
    periodic: ModelCheckpoint
    best: ModelCheckpoint
    samples: SampleCallback
    curves: CurveWriter
    overfit: OverfitWatch
    early_stop: EarlyStopping | None = None  # train.early_stop_patience
    pruning: TrialPruning | None = None  # a sweep's trial (PENWRIGHT_TRIAL)

    def all(self) -> list[L.Callback]:
        out = [self.throughput, self.periodic, self.best, self.samples, self.curves, self.overfit]
        return out + [c for c in (self.early_stop, self.pruning) if c is not None]


def checkpoints(ckpt_dir: Path, every_n_steps: int, keep_all: bool) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """(periodic + ``last.ckpt``, ``best.ckpt``). ``enable_version_counter=False``: a resumed run overwrites
    ``last`` and ``best`` instead of writing ``last-v1``, ``best-v1``; ``best`` stays the best of the whole run
    (its score is restored from the checkpoint)."""
    periodic = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step-{step:06d}",
        every_n_train_steps=every_n_steps,
        save_top_k=-1 if keep_all else 1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    return periodic, best


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temp file and renamed: a crash never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class Throughput(L.Callback):
    """``tokens_per_sec`` of the training steps alone (first in the callback list: sampling is not timed), and
    each step's own rate: their median is the steady rate, whatever the first steps spent warming up (the
    allocator, thread pools, ``torch.compile``'s compilation)."""

    def __init__(self):
        self.tokens, self.seconds, self._tick = 0, 0.0, 0.0
        self.step_rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._tick = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._tick
        tokens = batch.shape[0] * (batch.shape[-1] - 1) * trainer.world_size
        self.tokens += tokens
        self.seconds += seconds
        self.step_rates.append(tokens / seconds)
        pl_module.log("tokens_per_sec", tokens / seconds, on_step=True, on_epoch=False, rank_zero_only=True)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def median_step_rate(self) -> float:
        return statistics.median(self.step_rates)


def early_stopping(patience: int) -> EarlyStopping | None:
    """Lightning's early stopping on val loss (its state goes into every checkpoint, so a resumed run keeps
    counting), or None for ``patience`` 0."""
    if not patience:
        return None
    return EarlyStopping(
        monitor="val/loss", mode="min", patience=patience, check_on_train_epoch_end=False, verbose=False
    )


class TrialPruning(L.Callback):
    """A sweep's trial: each validation's bits per byte (val loss where there is none) goes to the Optuna trial at
    its step (bits per byte compare trials with different tokenizers), and when Optuna's pruner finds the trial
    hopeless, training stops there as an early stop does (the run ends normally, the best weights are saved,
    ``train.json`` says ``pruned_at_step``). Optuna's own Lightning callback reports per epoch and raises,
    which would leave no model, metrics or DVC experiment behind: this one reports per step and stops."""

    def __init__(self, trial, stop_after: float | None = None):
        self.trial, self.stop_after, self.pruned_at, self.started = trial, stop_after, None, 0.0

    @classmethod
    def from_env(cls) -> TrialPruning | None:
        from penwright.core.trials import trial_from_env

        found = trial_from_env()
        return None if found is None else cls(*found)

    def on_train_start(self, trainer, pl_module):
        self.started = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Over the sweep's time limit (``stop_after`` seconds of training): stopped at once, as pruned."""
        if self.stop_after is not None and self.pruned_at is None and time.monotonic() - self.started > self.stop_after:
            self.pruned_at, trainer.should_stop = trainer.global_step, True
            get_logger("train").info(f"stopped at step {trainer.global_step}: over the sweep's {self.stop_after:.0f} s")

    def on_validation_end(self, trainer, pl_module):
        if (
            trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero
        ):  # not the final validate()
            return
        metrics = trainer.callback_metrics
        name = "val/bpb" if "val/bpb" in metrics else "val/loss"  # bits per byte: comparable across tokenizers
        value = metrics.get(name)
        if value is None or self.pruned_at is not None:
            return
        step = trainer.global_step
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at, trainer.should_stop = step, True
            get_logger("train").info(
                f"pruned at step {step}: {name} {float(value):.4f} is worse than the sweep's median there"
            )


class OverfitWatch(L.Callback):
    """One warning when val loss has risen for ``evaluations`` validations in a row while train loss fell:
    "overfitting since step S; best step B" (from the val curve, so a resumed run sees its whole history)."""

    def __init__(self, curves: CurveWriter, evaluations: int = 2):
        self.curves, self.evaluations, self.warned = curves, evaluations, False

    def on_validation_end(self, trainer, pl_module):
        if self.warned or trainer.sanity_checking or not trainer.is_global_zero:
            return
        val = [(int(r["step"]), float(r["loss"])) for r in self.curves.rows["val"]]
        train = {int(r["step"]): float(r["loss"]) for r in self.curves.rows["train"]}
        k = self.evaluations
        if len(val) <= k:
            return
        recent = val[-(k + 1) :]
        rising = all(b[1] > a[1] for a, b in zip(recent, recent[1:]))
        before, now = _loss_at(train, recent[0][0]), _loss_at(train, recent[-1][0])
        if rising and before is not None and now is not None and now < before:
            best_step, best_loss = min(val, key=lambda r: r[1])
            get_logger("train").warning(
                f"overfitting since step {recent[0][0]}: val loss rose for {k} validations while train loss fell; "
                f"best step {best_step} (val loss {best_loss:.4f}). train.early_stop_patience stops such a run"
            )
            self.warned = True


def _loss_at(rows: dict[int, float], step: int) -> float | None:
    """The train loss logged at ``step``, else at the last step before it."""
    steps = [s for s in rows if s <= step]
    return rows[max(steps)] if steps else None


class CurveWriter(L.Callback):
    """``reports/curves/train.tsv`` (step, loss, lr), ``val.tsv`` (step, loss, ppl, bpb) and ``copies.tsv`` (step,
    the samples' median copied share and longest copied span: a curve of memorization) for ``dvc plots``."""

    SPLITS = ("train", "val", "copies")

    def __init__(self, out_dir: str | Path, every: int):
        self.out_dir, self.every = Path(out_dir), max(1, every)
        self.rows: dict[str, list[dict]] = {split: [] for split in self.SPLITS}
        self.loaded = False

    def state_dict(self) -> dict:
        """The rows so far go into every checkpoint: a run resumed from any of them (the periodic one after a
        crash too) continues exactly the curve that checkpoint had, whatever reached the files."""
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = {split: list(state_dict["rows"].get(split, [])) for split in self.SPLITS}
        self.loaded = True

    def add_copies(self, trainer, share: float, longest: int) -> None:
        """The samples' copy measures at this step (``SampleCallback``)."""
        self._load(trainer)
        row = {"step": trainer.global_step, "copied_share": f"{share:.4f}", "longest_copied": longest}
        self.rows["copies"] = [r for r in self.rows["copies"] if int(r["step"]) != row["step"]] + [row]
        self.flush(trainer)

    def on_train_start(self, trainer, pl_module):
        self._load(trainer)

    def _load(self, trainer) -> None:
        """A checkpoint without rows (written by an older penwright): a resumed run keeps the rows of the
        files up to its step. (A run resumed at its last step trains nothing and only validates: it must keep
        them too.)"""
        if self.loaded:
            return
        self.loaded = True
        start = trainer.global_step
        for split in self.rows:
            path = self.out_dir / f"{split}.tsv"
            if start and path.is_file():
                with open(path, newline="") as f:
                    self.rows[split] = [r for r in csv.DictReader(f, delimiter="\t") if int(r["step"]) <= start]
            else:
                self.rows[split] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            self._add_train_row(trainer)

    def _add_train_row(self, trainer) -> None:
        m, step = trainer.callback_metrics, trainer.global_step
        if "train/loss" in m and not any(int(r["step"]) == step for r in self.rows["train"][-1:]):
            self.rows["train"].append(
                {"step": step, "loss": f"{float(m['train/loss']):.5f}", "lr": f"{float(m.get('lr', 0.0)):.3e}"}
            )

    def on_validation_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        if "val/loss" in m and not trainer.sanity_checking:
            self._load(trainer)
            row = {
                "step": trainer.global_step,
                "loss": f"{float(m['val/loss']):.5f}",
                "ppl": f"{float(m['val/ppl']):.3f}",
                "bpb": f"{float(m.get('val/bpb', float('nan'))):.5f}",
            }
            self.rows["val"] = [r for r in self.rows["val"] if int(r["step"]) != row["step"]] + [row]
        self.flush(trainer)

    def on_train_end(self, trainer, pl_module):
        self._add_train_row(trainer)  # a run stopped early (pruned, early stop) ends its curve where it stopped
        self.flush(trainer)

    def flush(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for split, rows in self.rows.items():
            if not rows and split != "copies":  # (copies.tsv is a DVC output: written even with no samples measured)
                continue
            path = self.out_dir / f"{split}.tsv"
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as f:
                fields = list(rows[0]) if rows else ["step", "copied_share", "longest_copied"]
                writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
                writer.writeheader()
                writer.writerows(rows)
            tmp.replace(path)


class SampleCallback(L.Callback):
    """A chat corpus's samples are also the persona's replies (kind ``reply``) to ``openings``: contexts from the
    val conversations rendered by the chat template with the generation prompt (``prepare`` wrote them), each
    reply cut where the persona's turn ends. A prompt longer than the context keeps its end."""

    def __init__(
        self,
        cfg: schema.Sample,
        tokenizer,
        prompt_source: np.ndarray,
        out_dir: str | Path,
        openings: list[dict] | None = None,
        copies: CopyIndex | None = None,
        on_copies: Callable | None = None,
    ):
        self.copies, self.on_copies = copies, on_copies  # the training split's copy index; where its measures go
        self.cfg, self.every, self.temperatures = cfg, cfg.every_n_steps, list(cfg.temperatures)
        self.tokenizer = left_padded(tokenizer)  # a copy: the tokenizer train saves stays as it was
        self.tokenizer.truncation_side = "left"
        self.out_dir = Path(out_dir)
        self.prompts = self._prompts(prompt_source) + [("reply", o["prompt"]) for o in openings or []]
        self.last_step = -1

    def _prompts(self, source: np.ndarray) -> list[tuple[str, str]]:
        """[(kind, prompt text)]: fixed prompts, unconditional, and random prompts from the val text."""
        eos = self.tokenizer.eos_token
        prompts = [("prompt", str(p)) for p in self.cfg.prompts]
        prompts += [("unconditional", eos)] * self.cfg.unconditional
        n, length = self.cfg.random_prompts, self.cfg.random_prompt_tokens
        if n and source.size > length:
            rng = np.random.default_rng(self.cfg.seed)
            for start in rng.integers(0, source.size - length, size=n):
                ids = [int(t) for t in source[start : start + length]]
                prompts.append(("random", self.tokenizer.decode(ids)))
        return prompts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and step != self.last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self.last_step:
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def generate(self, model, temperature: float, step: int) -> list[str]:
        tok = self.tokenizer
        texts = [p for _, p in self.prompts]
        longest = model.config.n_positions - self.cfg.max_new_tokens
        enc = tok(
            texts, return_tensors="pt", padding=True, add_special_tokens=False, truncation=True, max_length=longest
        ).to(model.device)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=self.cfg.top_k or None,
            top_p=self.cfg.top_p,
            max_new_tokens=self.cfg.max_new_tokens,
            use_cache=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,  # show the full length: an <|endoftext|> stays visible in the text
        )
        texts = [tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=False) for row in out]
        return [t.split(tok.eos_token)[0] if kind == "reply" else t for (kind, _), t in zip(self.prompts, texts)]

    def sample(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        self.last_step = step
        if not trainer.is_global_zero or not self.prompts:
            return
        model = pl_module.model
        was_training = model.training
        model.eval()
        rows = []
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + step)
            for temperature in self.temperatures:
                for (kind, prompt), text in zip(self.prompts, self.generate(model, temperature, step)):
                    rows.append([step, kind, prompt, temperature, text])
        model.train(was_training)
        columns = ["step", "kind", "prompt", "temperature", "text"]
        if self.copies is not None:  # each sample's copy measures, and their summary as a curve
            measures = [self._measure(row[4]) for row in rows]
            rows = [[*row, m.longest, m.copied_share] for row, m in zip(rows, measures)]
            columns += ["longest_copied", "copied_share"]
            share, longest = statistics.median(m.copied_share for m in measures), max(m.longest for m in measures)
            for logger in trainer.loggers:
                logger.log_metrics({"samples/copied_share": share, "samples/longest_copied": longest}, step=step)
            if self.on_copies is not None:
                self.on_copies(trainer, share, longest)
        self._write_markdown(step, rows)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B: a new table each time, under one key
                logger.log_table(key="samples", columns=columns, data=rows, step=step)
        log(f"step {step}: {len(rows)} samples -> {self.out_dir}/step-{step:06d}.md")

    def _measure(self, text: str) -> CopyMeasures:
        assert self.copies is not None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return copy_measures(self.copies, ids, self.tokenizer.decode, self.cfg.copy_min_span)

    def _write_markdown(self, step: int, rows: list) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"# Samples at step {step}", ""]
        for temperature in self.temperatures:
            lines += [f"## temperature {temperature}", ""]
            for _, kind, prompt, temp, text, *copied in rows:
                if temp != temperature:
                    continue
                shown = "(unconditional)" if kind == "unconditional" else prompt.replace("\n", " ")
                lines += [f"**{kind}:** {shown}", ""]
                if copied:
                    lines += [f"copied: longest span {copied[0]} tokens, {copied[1]:.0%} of tokens in copied spans", ""]
                lines += [
                    "```text",
                    (prompt if kind != "unconditional" else "") + text,
                    "```",
                    "",
                ]
        atomic_write_text(self.out_dir / f"step-{step:06d}.md", "\n".join(lines))
