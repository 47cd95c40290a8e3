"""Stage ``train``: Lightning training of GPT-2 on the prepared tokens, from one composed config.

``train(cfg)`` builds data, model, callbacks, loggers and trainer, fits, and (rank 0) writes
``artifacts/model/`` in Hugging Face format, ``reports/train.json`` (DVC metrics) and
``reports/curves/{train,val}.tsv`` (DVC plots). Running again with a higher ``trainer.max_steps``
continues from ``<train.ckpt_dir>/last.ckpt`` (same windows, same W&B run), or from the newest intact
periodic checkpoint when ``last.ckpt`` is damaged; ``train.resume=false`` starts fresh.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zipfile
from pathlib import Path

import lightning as L
import torch

from penwright.core import schema
from penwright.core.atomic import atomic_write_text, staged_dir
from penwright.core.copy_index import CopyIndex
from penwright.core.errors import ConfigError, PenwrightError
from penwright.core.files import save_tokenizer
from penwright.core.log import get_logger, global_rank
from penwright.train import lora
from penwright.train.callbacks import (
    AtomicCheckpointIO,
    Callbacks,
    CurveWriter,
    OverfitWatch,
    SampleCallback,
    Throughput,
    TrialPruning,
    checkpoints,
    early_stopping,
)
from penwright.train.data import PreparedData, load_meta, load_openings
from penwright.train.loggers import build_loggers
from penwright.train.model import LitGPT2, build_model, lr_lambda

log = get_logger("train").info


def train(cfg: schema.Config) -> dict:
    """Train as configured; the metrics (also in ``reports/train.json``)."""
    start = time.perf_counter()
    tcfg, reports, ckpt_dir = cfg.train, Path(cfg.paths.reports), Path(cfg.train.ckpt_dir)
    prepared = Path(cfg.data.out_dir)
    meta = load_meta(prepared)
    tokenizer = PreparedData.load_tokenizer(prepared)  # same files online or off; a damaged one: a one-line error
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if tcfg.keep_freed_memory and not keep_freed_memory():
        log(
            "train.keep_freed_memory: glibc's mallopt is not there or refused the settings: memory is allocated as usual"
        )
    data = PreparedData(
        prepared, tcfg.block_size, tcfg.batch_size, cfg.seed, tcfg.val_batches, cfg.trainer.accumulate_grad_batches
    )
    model = build_model(cfg.model, len(tokenizer), int(tokenizer.eos_token_id), tcfg.block_size)
    if tcfg.lora.enabled:
        model = lora.apply(
            model,
            tcfg.lora,
            source=str(cfg.model.name_or_path),  # the schema refuses LoRA on a scratch model
            gradient_checkpointing=tcfg.gradient_checkpointing,
        )
    module = LitGPT2(model, tcfg, data.bytes_per_token)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{'from ' + cfg.model.name_or_path if cfg.model.name_or_path else 'from scratch'}"
        f"{f', LoRA rank {tcfg.lora.rank}: {trainable / 1e6:.3f}M trained' if tcfg.lora.enabled else ''}; "
        f"train split {data.train_tokens.size:,} tokens"
    )
    check_run(cfg, data)  # every check runs before any file is touched
    strategy = build_strategy(cfg.trainer)

    fingerprint = _fingerprint(cfg, meta, model)
    resume_from = resume_point(ckpt_dir, fingerprint) if tcfg.resume else None
    if global_rank() == 0:  # other ranks start while rank 0 trains: they must not touch its files
        prepare_ckpt_dir(
            ckpt_dir,
            fingerprint,
            fresh=resume_from is None,
            stale=[reports / "samples", reports / "curves"],
        )
    if tcfg.auto_batch_size:
        choose_micro_batch(cfg, module, data, ckpt_dir, resuming=resume_from is not None)

    periodic, best = checkpoints(ckpt_dir, tcfg.ckpt_every_n_steps, tcfg.keep_all_checkpoints)
    curves = CurveWriter(reports / "curves", cfg.trainer.log_every_n_steps)
    index = CopyIndex(prepared) if cfg.sample.copy_min_span and (prepared / "index" / "index.json").is_file() else None
    callbacks = Callbacks(
        throughput=Throughput(),
        periodic=periodic,
        best=best,
        samples=SampleCallback(
            cfg.sample,
            tokenizer,
            data.val_tokens,
            reports / "samples",
            load_openings(prepared),
            index,
            curves.add_copies,
        ),
        curves=curves,
        overfit=OverfitWatch(curves),
        early_stop=early_stopping(tcfg.early_stop_patience),
        pruning=TrialPruning.from_env() if global_rank() == 0 else None,  # in a sweep's trial only
    )
    loggers = build_loggers(cfg, ckpt_dir, resume_from is not None)
    if tcfg.auto_batch_size:
        for logger in loggers:  # the run's config says which split ran
            logger.log_hyperparams(
                {"auto_batch_size": {"micro_batch": data.batch_size, "accumulate_grad_batches": data.accumulate}}
            )
    trainer = build_trainer(cfg, strategy, callbacks, loggers, data.accumulate)
    if tcfg.compile:
        module.model = torch.compile(module.model)
    trainer.fit(module, datamodule=data, ckpt_path=None if resume_from is None else str(resume_from))
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")  # the end state, whatever step it fell on
    final = trainer.validate(module, datamodule=data, verbose=False)[0]

    result = {}
    if trainer.is_global_zero:
        result = _finish(cfg, trainer, module, tokenizer, data, final, callbacks, start, resume_from is not None)
        for logger in loggers:  # close the W&B run: its files are complete, the next train() starts anew
            logger.experiment.finish()
    return result


# -- checks and resume ---------------------------------------------------------------------------------


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep the memory a training step frees, for the next step (``train.keep_freed_memory``).

    By default glibc hands memory back to the OS as a step frees it (unmapping large blocks such as the logits,
    trimming the heap), so the next step faults those pages in again while the kernel zeroes them: on 2 cores
    about a quarter of a small model's step. Serving blocks up to 32 MiB from the heap and trimming it only past
    1 GiB of free memory keeps them mapped (the process's resident memory stays at its peak). Once set, it holds for the whole process.
    False where the C library has no ``mallopt`` (not Linux, or not glibc)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    settings = ((m_mmap_threshold, 32 << 20), (m_top_pad, 256 << 20), (m_trim_threshold, 1 << 30))
    return all(mallopt(key, value) == 1 for key, value in settings)


def check_run(cfg: schema.Config, data: PreparedData) -> None:
    """What the schema cannot know: checks against the prepared data and the run's shape."""
    tcfg, block = cfg.train, cfg.train.block_size
    windows = max(1, data.train_tokens.size - block)
    if tcfg.batch_size > windows and data.train_tokens.size > block:
        raise ConfigError(
            f"train.batch_size={tcfg.batch_size} is larger than the {windows} distinct windows of "
            f"{block + 1} tokens in {cfg.data.out_dir}/train.bin; lower train.batch_size or train.block_size"
        )
    lr_lambda(tcfg.warmup_steps, tcfg.decay_steps or cfg.trainer.max_steps, tcfg.schedule, tcfg.min_lr_ratio)
    if tcfg.auto_batch_size and (str(cfg.trainer.devices) not in ("1", "auto") or cfg.trainer.num_nodes > 1):
        raise ConfigError(
            f"train.auto_batch_size=true with trainer.devices={cfg.trainer.devices}, trainer.num_nodes="
            f"{cfg.trainer.num_nodes}: Lightning's batch-size finder runs on one device; find the "
            f"micro-batch with trainer.devices=1, then set train.batch_size to it"
        )


def damaged(path: Path) -> str | None:
    """Why a checkpoint cannot be read (truncated by a full disk or a bad copy, bytes changed), or None.
    torch's checkpoint is a zip whose entries carry CRC-32s: every entry is checked, then torch opens it
    (memory-mapped: the tensors are not read again)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"{bad} fails its checksum"
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # zipfile, torch and pickle raise many types for a damaged file
        return f"not a complete checkpoint: {type(err).__name__}: {' '.join(str(err).split())[:160]}"
    return None


def _step(path: Path) -> int:
    digits = path.stem.removeprefix("step-")
    return int(digits) if digits.isdigit() else -1


def resume_point(ckpt_dir: Path, fingerprint: dict) -> Path | None:
    """The checkpoint a resumed run continues from: ``last.ckpt``; when it is damaged or missing (a kill
    during its first write), the newest intact periodic checkpoint (and the log says so); None when there is
    nothing to resume."""
    last = ckpt_dir / "last.ckpt"
    periodic = sorted(ckpt_dir.glob("step-*.ckpt"), key=_step, reverse=True)  # newest first
    if not last.is_file() and not periodic:
        return None
    fp_file = ckpt_dir / "fingerprint.json"
    saved = json.loads(fp_file.read_text()) if fp_file.is_file() else fingerprint
    if saved != fingerprint:
        fresh = f"Start fresh with train.resume=false (the old checkpoints in {ckpt_dir} are replaced)"
        was, now = saved.get("lora"), fingerprint.get("lora")
        if (was is None) != (now is None):
            kind = ("a full finetune", "a LoRA run (train.lora.enabled=true)")
            raise PenwrightError(
                f"{last}: this checkpoint is {kind[was is not None]} and this run is {kind[now is not None]}: set "
                f"train.lora.enabled={str(was is not None).lower()} to continue it, or: {fresh}"
            )
        if (
            was
            and now
            and was["base_digest"] != now["base_digest"]
            and {**was, "base_digest": 0} == {**now, "base_digest": 0}
        ):
            raise PenwrightError(
                f"{last}: this LoRA checkpoint was trained on other base weights than model.name_or_path="
                f"{fingerprint['model'].get('name_or_path')} holds now; point it at the run's base, or: {fresh}"
            )
        raise PenwrightError(
            f"{last}: this checkpoint was trained with another model, block size, tokenizer or LoRA shape. {fresh}"
        )
    why = damaged(last) if last.is_file() else "missing"
    if why is None:
        return last
    for candidate in periodic:
        if damaged(candidate) is None:
            state = f"is damaged ({why})" if last.is_file() else "is missing"
            log(f"{last} {state}: resuming from {candidate.name}, the newest intact periodic checkpoint")
            return candidate
    raise PenwrightError(
        f"{last}: {f'damaged ({why})' if last.is_file() else 'missing'}, and no intact periodic checkpoint in {ckpt_dir} to resume "
        f"from. Start fresh with train.resume=false"
    )


def prepare_ckpt_dir(ckpt_dir: Path, fingerprint: dict, fresh: bool, stale: list[Path]) -> None:
    """A fresh run starts from an empty checkpoint dir (and no samples or curve rows of an earlier run); a
    resumed one only loses the temp files a killed checkpoint write left behind."""
    if fresh:
        for path in (ckpt_dir, *stale):
            shutil.rmtree(path, ignore_errors=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for leftover in ckpt_dir.glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)
    atomic_write_text(ckpt_dir / "fingerprint.json", json.dumps(fingerprint, indent=2) + "\n")


def _fingerprint(cfg: schema.Config, meta: dict, model) -> dict:
    """What a checkpoint must share with this run to be resumed (a LoRA run: its adapters' shape and base)."""
    fingerprint = {
        "model": {k: v for k, v in cfg.model.to_dict().items() if k != "activation"},  # the same function either way
        "block_size": cfg.train.block_size,
        "tokenizer_md5": meta["tokenizer"]["md5"],
        "vocab_size": meta["vocab_size"],
    }
    if cfg.train.lora.enabled:
        lcfg = cfg.train.lora
        fingerprint["lora"] = {
            "rank": lcfg.rank,
            "alpha": lcfg.alpha,
            "targets": list(lcfg.targets),
            "base_digest": model.penwright_base_digest,
        }
    return fingerprint


# -- trainer, strategy and batch size ------------------------------------------------------------------


def build_trainer(cfg: schema.Config, strategy, callbacks: Callbacks, loggers: list, accumulate: int) -> L.Trainer:
    tr, tcfg = cfg.trainer, cfg.train
    return L.Trainer(
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
        callbacks=callbacks.all(),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        enable_progress_bar=tr.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(cfg.train.ckpt_dir),
    )


def choose_micro_batch(cfg: schema.Config, module, data: PreparedData, ckpt_dir: Path, resuming: bool) -> None:
    """``train.auto_batch_size``: the largest micro-batch that fits, accumulated to the configured effective
    batch; a resumed run keeps the split its first chunk found (``batch.json``)."""
    batch_file = ckpt_dir / "batch.json"
    requested = data.batch_size * data.accumulate
    if resuming and batch_file.is_file():
        chosen = json.loads(batch_file.read_text())
    else:
        fits = find_micro_batch(cfg, module, data, ckpt_dir / "batch-finder")
        shutil.rmtree(ckpt_dir / "batch-finder", ignore_errors=True)
        micro, accumulate = split_batch(requested, fits)
        chosen = {"requested": requested, "fits": fits, "micro_batch": micro, "accumulate_grad_batches": accumulate}
        if global_rank() == 0:
            atomic_write_text(batch_file, json.dumps(chosen, indent=2) + "\n")
    data.batch_size, data.accumulate = chosen["micro_batch"], chosen["accumulate_grad_batches"]
    log(
        f"auto batch size: micro-batch {data.batch_size} x {data.accumulate} accumulated = "
        f"{data.batch_size * data.accumulate} windows a step (asked for {requested}; "
        f"{chosen['fits']} fit) -> {batch_file}"
    )


def build_strategy(tr: schema.Trainer):
    """Lightning's strategy: its name, or for ``fsdp`` an FSDPStrategy with each GPT-2 block one shard unit."""
    name = tr.strategy
    if name != "fsdp":
        return name
    if tr.accelerator == "cpu":
        raise ConfigError(
            "trainer.strategy=fsdp runs on GPUs only (Lightning's FSDP needs CUDA): use trainer=fsdp on "
            "a GPU machine, or trainer=ddp trainer.accelerator=cpu to test several processes on CPU"
        )
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    f = tr.fsdp
    assert f is not None  # the schema requires it with strategy fsdp
    return FSDPStrategy(
        auto_wrap_policy={GPT2Block},
        activation_checkpointing_policy={GPT2Block} if f.activation_checkpointing else None,
        sharding_strategy=f.sharding,
        cpu_offload=f.cpu_offload,
    )


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
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=tr.num_nodes,
        strategy=build_strategy(tr),
        precision=tr.precision,
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(workdir),
    )
    found = Tuner(trainer).scale_batch_size(
        module,
        datamodule=data,
        mode="power",
        init_val=1,
        steps_per_trial=2,
        max_trials=math.ceil(math.log2(requested)) + 1,
    )  # 1, 2, 4, ... >= requested
    return int(found or 1)


def _keep_best(module, best_ckpt, best_step: int) -> int:
    """Load the weights of ``best_step`` (``best.ckpt``) into the module, unless they are the ones it has; the step
    whose weights it holds."""
    step = module.trainer.global_step
    path = Path(best_ckpt.best_model_path or "")
    if best_step == step or not path.is_file():
        return step
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("global_step") != best_step:
        log(f"{path} holds step {state.get('global_step')}, not the best step {best_step}: saving the last weights")
        return step
    module.load_state_dict(state["state_dict"], strict=not module.lora)  # a LoRA checkpoint holds the adapters only
    log(f"saving the weights of step {best_step} (the lowest val loss; train.save=best), not of step {step}")
    return best_step


# -- the end of a run -----------------------------------------------------------------------------------


def _finish(cfg, trainer, module, tokenizer, data, final, callbacks: Callbacks, start, resumed) -> dict:
    throughput, best_ckpt = callbacks.throughput, callbacks.best
    out = Path(cfg.train.out_dir)
    val = [(int(r["step"]), float(r["loss"])) for r in callbacks.curves.rows["val"]]
    best_step = min(val, key=lambda r: r[1])[0] if val else trainer.global_step  # the minimum of the val curve
    saved_step = _keep_best(module, best_ckpt, best_step) if cfg.train.save == "best" else trainer.global_step
    pruned = callbacks.pruning is not None and callbacks.pruning.pruned_at is not None
    early = callbacks.early_stop is not None and trainer.global_step < trainer.max_steps and not pruned
    if early:
        log(
            f"early stop at step {trainer.global_step}: val loss has not improved for "
            f"{cfg.train.early_stop_patience} validations; best step {best_step}"
        )
    model = module.model
    model = getattr(model, "_orig_mod", model)
    sizes = {}
    with staged_dir(out) as tmp:
        if cfg.train.lora.enabled:  # the adapter in tmp/adapter, and merged into the weights beside it
            sizes = lora.save(model, tmp)
        else:
            model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)

    # totals over every chunk of this run (a resumed run adds to what the earlier chunks did)
    progress_file = Path(cfg.train.ckpt_dir) / "progress.json"
    before = json.loads(progress_file.read_text()) if resumed and progress_file.is_file() else {}
    seconds = before.get("wall_seconds", 0.0) + time.perf_counter() - start
    step_seconds = before.get("train_seconds", 0.0) + throughput.seconds
    step_tokens = before.get("timed_tokens", 0) + throughput.tokens
    atomic_write_text(
        progress_file,
        json.dumps({"wall_seconds": seconds, "train_seconds": step_seconds, "timed_tokens": step_tokens}) + "\n",
    )
    steps = trainer.global_step
    tokens = steps * data.batch_size * cfg.train.block_size * data.accumulate * trainer.world_size
    best = best_ckpt.best_model_score
    metrics = {
        "val_loss": round(float(final["val/loss"]), 5),
        "val_ppl": round(float(final["val/ppl"]), 3),
        "val_bpb": round(float(final.get("val/bpb", math.nan)), 5),
        "best_val_loss": round(
            min(float(best), float(final["val/loss"])) if best is not None else float(final["val/loss"]), 5
        ),  # the final validation counts too
        "steps": steps,
        "tokens": tokens,
        "tokens_per_sec": round(step_tokens / step_seconds, 1) if step_seconds else 0.0,
        # this run's steady rate (warmup and compiling left out); None when it trained no step (resumed at the end)
        "tokens_per_sec_median_step": round(throughput.median_step_rate, 1) if throughput.step_rates else None,
        "wall_seconds": round(seconds, 1),
        "resumed": resumed,
        "device": str(module.device),
        "micro_batch": data.batch_size,
        "accumulate_grad_batches": data.accumulate,
        "best_step": best_step,
        "saved_step": saved_step,  # the step whose weights are in train.out_dir (train.save)
        "early_stopped": early,
        # a sweep's trial that Optuna's pruner stopped: the step it stopped at (None: it ran its steps)
        "pruned_at_step": callbacks.pruning.pruned_at if callbacks.pruning is not None else None,
        **sizes,
    }
    if callbacks.curves.rows["copies"]:  # the last samples' copy measures: how much the model copies now
        last = callbacks.curves.rows["copies"][-1]
        metrics["samples_copied_share"] = float(last["copied_share"])
        metrics["samples_longest_copied"] = int(last["longest_copied"])
    best_val = metrics["best_val_loss"]
    metrics["best_val_ppl"] = round(math.exp(best_val), 3)
    if data.bytes_per_token:
        metrics["best_val_bpb"] = round(best_val / math.log(2) / data.bytes_per_token, 5)
    report = atomic_write_text(Path(cfg.paths.reports) / "train.json", json.dumps(metrics, indent=2) + "\n")
    log(
        f"{steps} steps on {metrics['device']}, val loss {metrics['val_loss']} (bpb {metrics['val_bpb']}) "
        f"in {seconds:.0f} s; model -> {out}/, metrics -> {report}"
    )
    return metrics
