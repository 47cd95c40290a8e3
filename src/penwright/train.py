"""Stage ``train``: Lightning training of GPT-2 on the prepared tokens, from one composed config.

``train(cfg)`` builds data, model, callbacks, loggers and trainer, fits, and (rank 0) writes
``artifacts/model/`` in Hugging Face format, ``reports/train.json`` (DVC metrics) and
``reports/curves/{train,val}.tsv`` (DVC plots). Running again with a higher ``trainer.max_steps``
continues from ``<train.ckpt_dir>/last.ckpt`` (same windows, same W&B run); ``train.resume=false``
starts fresh.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import netrc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from transformers import AutoTokenizer

from penwright import schema
from penwright.data import PreparedData, load_meta
from penwright.errors import ConfigError, PenwrightError
from penwright.fsutil import atomic_write_text, replace_dir, temp_dir_for
from penwright.model import LitGPT2, build_model, lr_lambda
from penwright.samples import SampleCallback


def log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temp file and renamed: a crash never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class Throughput(L.Callback):
    """``tokens_per_sec`` of the training steps alone (first in the callback list: sampling is not timed)."""

    def __init__(self, skip_steps: int = 0):
        self.tokens, self.seconds, self._tick = 0, 0.0, None
        self.skip_steps = skip_steps  # not timed: allocator and thread-pool warmup (benchmarks)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._tick = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._tick
        tokens = batch.shape[0] * (batch.shape[1] - 1) * trainer.world_size
        if trainer.global_step > self.skip_steps:
            self.tokens += tokens
            self.seconds += seconds
        pl_module.log("tokens_per_sec", tokens / seconds, on_step=True, on_epoch=False, rank_zero_only=True)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class CurveWriter(L.Callback):
    """``reports/curves/train.tsv`` (step, loss, lr) and ``val.tsv`` (step, loss, ppl, bpb) for ``dvc plots``."""

    def __init__(self, out_dir: str | Path, every: int):
        self.out_dir, self.every = Path(out_dir), max(1, every)
        self.rows: dict[str, list[dict]] = {"train": [], "val": []}
        self.loaded = False

    def on_train_start(self, trainer, pl_module):
        self._load(trainer)

    def _load(self, trainer) -> None:
        """Once the checkpoint is restored: a resumed run keeps the rows up to its step. (A run resumed
        at its last step trains nothing and only validates: it must keep them too.)"""
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
            m = trainer.callback_metrics
            if "train/loss" in m:
                self.rows["train"].append({"step": step, "loss": f"{float(m['train/loss']):.5f}",
                                           "lr": f"{float(m.get('lr', 0.0)):.3e}"})

    def on_validation_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        if "val/loss" in m and not trainer.sanity_checking:
            self._load(trainer)
            row = {"step": trainer.global_step, "loss": f"{float(m['val/loss']):.5f}",
                   "ppl": f"{float(m['val/ppl']):.3f}", "bpb": f"{float(m.get('val/bpb', float('nan'))):.5f}"}
            self.rows["val"] = [r for r in self.rows["val"] if int(r["step"]) != row["step"]] + [row]
        self.flush(trainer)

    def on_train_end(self, trainer, pl_module):
        self.flush(trainer)

    def flush(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for split, rows in self.rows.items():
            if not rows:
                continue
            path = self.out_dir / f"{split}.tsv"
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
                writer.writeheader()
                writer.writerows(rows)
            tmp.replace(path)


def rank_zero() -> bool:
    """Whether this process is global rank 0 (Lightning reads RANK / LOCAL_RANK / SLURM_PROCID)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# -- W&B -------------------------------------------------------------------------------------------


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; online when an API key or login exists; else offline (with a notice)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    log("no W&B login found (WANDB_API_KEY or `wandb login`): logging offline; `wandb sync wandb/offline-run-*` uploads later")
    return "offline"


def run_metadata(cfg: schema.Config) -> dict:
    """What the W&B run config holds beside the resolved config: git commit, data version."""
    meta = {"config": cfg.to_dict()}
    try:
        meta["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        meta["git_commit"] = None
    dvc_file = Path("data.dvc")
    meta["data_dvc_md5"] = hashlib.md5(dvc_file.read_bytes()).hexdigest() if dvc_file.is_file() else None
    return meta


def build_loggers(cfg: schema.Config, ckpt_dir: Path, resuming: bool) -> list:
    kind = str(cfg.logger.get("kind", "none"))
    if kind == "none":
        return []
    if kind != "wandb":
        raise ConfigError(f"logger.kind={kind!r}: use wandb or none")
    mode = wandb_mode()
    if mode == "disabled":
        return []
    from lightning.pytorch.loggers import WandbLogger

    id_file = ckpt_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    if run_id is None and rank_zero():  # only rank 0 has a real W&B run; the others log nothing
        import secrets

        run_id = secrets.token_hex(4)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    save_dir = Path(cfg.logger.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=cfg.logger.project,
        group=cfg.logger.get("group"),
        tags=list(cfg.logger.get("tags") or []),
        job_type=cfg.logger.get("job_type"),
        name=os.environ.get("DVC_EXP_NAME") or cfg.logger.get("name"),
        save_dir=str(save_dir),
        offline=mode == "offline",
        id=run_id,
        resume="allow",
        log_model=False,
    )
    logger.log_hyperparams(run_metadata(cfg))  # rank 0 only
    return [logger]


# -- strategy and batch size -------------------------------------------------------------------------


def build_strategy(tr: schema.Trainer):
    """Lightning's strategy: its name, or for ``fsdp`` an FSDPStrategy with each GPT-2 block one shard unit."""
    name = tr.strategy
    if name != "fsdp":
        return name
    if tr.accelerator == "cpu":
        raise ConfigError("trainer.strategy=fsdp runs on GPUs only (Lightning's FSDP needs CUDA): use trainer=fsdp on "
                          "a GPU machine, or trainer=ddp trainer.accelerator=cpu to test several processes on CPU")
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    f = tr.get("fsdp") or {}
    return FSDPStrategy(auto_wrap_policy={GPT2Block},
                        activation_checkpointing_policy={GPT2Block} if f.get("activation_checkpointing", True) else None,
                        sharding_strategy=str(f.get("sharding", "FULL_SHARD")), cpu_offload=bool(f.get("cpu_offload", False)))


def split_batch(requested: int, fits: int) -> tuple[int, int]:
    """(micro-batch, accumulation): the fewest accumulation steps with a micro-batch of at most ``fits``
    windows that make the ``requested`` effective batch (rounded up to a whole micro-batch)."""
    fits = max(1, min(int(fits), int(requested)))
    accumulate = math.ceil(requested / fits)
    return math.ceil(requested / accumulate), accumulate


def find_micro_batch(cfg: schema.Config, module, data, workdir: Path) -> int:
    """The largest micro-batch (a power of two, up to the effective batch) that runs a training step: Lightning's
    batch-size finder, on a throwaway trainer; the module's weights are restored after its trials."""
    from lightning.pytorch.tuner import Tuner

    tr = cfg.trainer
    requested = data.batch_size * data.accumulate
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes,
                        strategy=build_strategy(tr), precision=tr.precision, max_steps=10, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(workdir))
    found = Tuner(trainer).scale_batch_size(module, datamodule=data, mode="power", init_val=1, steps_per_trial=2,
                                            max_trials=math.ceil(math.log2(requested)) + 1)  # 1, 2, 4, ... >= requested
    return int(found or 1)


# -- the stage --------------------------------------------------------------------------------------


def _fingerprint(cfg: schema.Config, meta: dict) -> dict:
    """What a checkpoint must share with this run to be resumed."""
    return {"model": cfg.model.to_dict(), "block_size": cfg.train.block_size,
            "tokenizer_md5": meta["tokenizer"]["md5"], "vocab_size": meta["vocab_size"]}


def train(cfg: schema.Config, *, untimed_steps: int = 0) -> dict:
    """Train as configured. ``untimed_steps``: the first steps are left out of ``tokens_per_sec`` (warmup and
    ``torch.compile``'s compilation; the GPU check and benchmarks set it)."""
    start = time.perf_counter()
    tcfg = cfg.train
    prepared = Path(cfg.data.out_dir)
    meta = load_meta(prepared)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer", local_files_only=True)  # same files online or off
    block = tcfg.block_size
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data = PreparedData(prepared, block, tcfg.batch_size, cfg.seed, tcfg.val_batches,
                        cfg.trainer.accumulate_grad_batches)
    windows = max(1, data.train_tokens.size - block)
    if tcfg.batch_size > windows and data.train_tokens.size > block:
        raise ConfigError(
            f"train.batch_size={tcfg.batch_size} is larger than the {windows} distinct windows of "
            f"{block + 1} tokens in {prepared}/train.bin; lower train.batch_size or train.block_size"
        )
    model = build_model(cfg.model, len(tokenizer), int(tokenizer.eos_token_id), block)
    module = LitGPT2(model, tcfg, data.bytes_per_token)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{'from ' + cfg.model.name_or_path if cfg.model.get('name_or_path') else 'from scratch'}; "
        f"train split {data.train_tokens.size:,} tokens")

    # every config check runs before any file is touched
    lr_lambda(tcfg.warmup_steps, int(tcfg.get("decay_steps") or cfg.trainer.max_steps), tcfg.schedule,
              tcfg.min_lr_ratio)
    strategy = build_strategy(cfg.trainer)
    if tcfg.get("auto_batch_size") and (str(cfg.trainer.devices) not in ("1", "auto") or cfg.trainer.num_nodes > 1):
        raise ConfigError(f"train.auto_batch_size=true with trainer.devices={cfg.trainer.devices}, trainer.num_nodes="
                          f"{cfg.trainer.num_nodes}: Lightning's batch-size finder runs on one device; find the "
                          f"micro-batch with trainer.devices=1, then set train.batch_size to it")
    reports = Path(cfg.paths.reports)
    sampler = SampleCallback(cfg.sample, tokenizer, data.val_tokens, reports / "samples")
    ckpt_dir = Path(tcfg.ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    fingerprint = _fingerprint(cfg, meta)
    fp_file = ckpt_dir / "fingerprint.json"
    resuming = tcfg.resume and last.is_file()
    if resuming and fp_file.is_file() and json.loads(fp_file.read_text()) != fingerprint:
        raise PenwrightError(
            f"{last}: this checkpoint was trained with another model, block size or tokenizer. "
            f"Start fresh with train.resume=false (the old checkpoints in {ckpt_dir} are replaced)"
        )
    if rank_zero():  # other ranks start while rank 0 trains: they must not touch its files
        if not resuming:  # a fresh run: no checkpoints, samples or curve rows of an earlier run remain
            for stale in (ckpt_dir, reports / "samples", reports / "curves"):
                shutil.rmtree(stale, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fp_file.write_text(json.dumps(fingerprint, indent=2) + "\n")

    if tcfg.get("auto_batch_size"):  # the largest micro-batch that fits; the effective batch stays as configured
        batch_file = ckpt_dir / "batch.json"
        requested = data.batch_size * data.accumulate
        if resuming and batch_file.is_file():  # a resumed run keeps the split its first chunk found
            chosen = json.loads(batch_file.read_text())
        else:
            fits = find_micro_batch(cfg, module, data, ckpt_dir / "batch-finder")
            shutil.rmtree(ckpt_dir / "batch-finder", ignore_errors=True)
            micro, accumulate = split_batch(requested, fits)
            chosen = {"requested": requested, "fits": fits, "micro_batch": micro, "accumulate_grad_batches": accumulate}
            if rank_zero():
                atomic_write_text(batch_file, json.dumps(chosen, indent=2) + "\n")
        data.batch_size, data.accumulate = chosen["micro_batch"], chosen["accumulate_grad_batches"]
        log(f"auto batch size: micro-batch {data.batch_size} x {data.accumulate} accumulated = "
            f"{data.batch_size * data.accumulate} windows a step (asked for {requested}; "
            f"{chosen['fits']} fit) -> {batch_file}")

    callbacks = [
        Throughput(skip_steps=untimed_steps),
        ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", every_n_train_steps=tcfg.ckpt_every_n_steps,
                        save_top_k=-1 if tcfg.keep_all_checkpoints else 1, save_last=True,
                        auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                        auto_insert_metric_name=False),
        sampler,
        CurveWriter(reports / "curves", cfg.trainer.log_every_n_steps),
    ]
    loggers = build_loggers(cfg, ckpt_dir, resuming)
    if tcfg.get("auto_batch_size"):
        for logger in loggers:  # the run's config says which split ran
            logger.log_hyperparams({"auto_batch_size": {"micro_batch": data.batch_size,
                                                        "accumulate_grad_batches": data.accumulate}})
    tr = cfg.trainer
    accumulate = data.accumulate
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=tr.num_nodes,
        strategy=strategy,
        precision=tr.precision,
        max_steps=tr.max_steps,
        val_check_interval=tcfg.val_every_n_steps * accumulate,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=tcfg.grad_clip or None,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=tr.log_every_n_steps,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        enable_progress_bar=tr.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(ckpt_dir),
    )
    if tcfg.get("compile"):
        module.model = torch.compile(module.model)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resuming else None)
    trainer.save_checkpoint(last)  # the end state, whatever step it fell on
    final = trainer.validate(module, datamodule=data, verbose=False)[0]

    result = {}
    if trainer.is_global_zero:
        result = _finish(cfg, trainer, module, tokenizer, data, final, callbacks, start, resuming)
        for logger in loggers:  # close the W&B run: its files are complete, the next train() starts anew
            logger.experiment.finish()
    return result


def _finish(cfg, trainer, module, tokenizer, data, final, callbacks, start, resumed) -> dict:
    throughput, best_ckpt = callbacks[0], callbacks[2]
    out = Path(cfg.train.out_dir)
    tmp = temp_dir_for(out)
    model = module.model
    model = getattr(model, "_orig_mod", model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out)

    # totals over every chunk of this run (a resumed run adds to what the earlier chunks did)
    progress_file = Path(cfg.train.ckpt_dir) / "progress.json"
    before = json.loads(progress_file.read_text()) if resumed and progress_file.is_file() else {}
    seconds = before.get("wall_seconds", 0.0) + time.perf_counter() - start
    step_seconds = before.get("train_seconds", 0.0) + throughput.seconds
    step_tokens = before.get("timed_tokens", 0) + throughput.tokens
    atomic_write_text(progress_file, json.dumps({"wall_seconds": seconds, "train_seconds": step_seconds,
                                                 "timed_tokens": step_tokens}) + "\n")
    steps = trainer.global_step
    tokens = steps * data.batch_size * cfg.train.block_size * data.accumulate * trainer.world_size
    best = best_ckpt.best_model_score
    metrics = {
        "val_loss": round(float(final["val/loss"]), 5),
        "val_ppl": round(float(final["val/ppl"]), 3),
        "val_bpb": round(float(final.get("val/bpb", math.nan)), 5),
        "best_val_loss": round(min(float(best), float(final["val/loss"])) if best is not None
                               else float(final["val/loss"]), 5),  # the final validation counts too
        "steps": steps,
        "tokens": tokens,
        "tokens_per_sec": round(step_tokens / step_seconds, 1) if step_seconds else 0.0,
        "wall_seconds": round(seconds, 1),
        "resumed": resumed,
        "device": str(module.device),
        "micro_batch": data.batch_size,
        "accumulate_grad_batches": data.accumulate,
    }
    best_val = metrics["best_val_loss"]
    metrics["best_val_ppl"] = round(math.exp(best_val), 3)
    if data.bytes_per_token:
        metrics["best_val_bpb"] = round(best_val / math.log(2) / data.bytes_per_token, 5)
    report = atomic_write_text(Path(cfg.paths.reports) / "train.json", json.dumps(metrics, indent=2) + "\n")
    log(f"{steps} steps on {metrics['device']}, val loss {metrics['val_loss']} (bpb {metrics['val_bpb']}) "
        f"in {seconds:.0f} s; model -> {out}/, metrics -> {report}")
    return metrics
