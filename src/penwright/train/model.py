"""The model: transformers' ``GPT2LMHeadModel`` (pretrained or new), wrapped in a LightningModule.

The module computes next-token cross-entropy on windows of ``block_size + 1`` tokens, logs
``train/loss``, ``lr`` and ``tokens_per_sec`` (and, on GPU, peak memory), and reports validation
``val/loss``, ``val/ppl`` and ``val/bpb`` (bits per byte of raw text, so runs with different
tokenizers compare). The optimizer is AdamW (fused on CUDA) with no weight decay on biases,
LayerNorm and position embeddings, a linear warmup, then cosine or linear decay.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from penwright.core import schema
from penwright.core.errors import ConfigError, PenwrightError
from penwright.core.hub import load_pretrained
from penwright.train.data import IGNORE


def build_model(model_cfg: schema.Model, vocab_size: int, eos_token_id: int, block_size: int) -> GPT2LMHeadModel:
    """A GPT-2 from ``model.name_or_path`` (hub name or local dir), or a new one of the configured sizes."""
    if model_cfg.name_or_path:
        model = load_pretrained(model_cfg.name_or_path, GPT2LMHeadModel.from_pretrained, "model", "model.name_or_path")
        if vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"model.name_or_path={model_cfg.name_or_path}: the prepared tokenizer has {vocab_size} tokens but the "
                f"model only {model.config.vocab_size}; prepare with this model's tokenizer "
                f"(model.tokenizer.type=pretrained) and rerun `penwright prepare`"
            )
    else:  # the schema checked the sizes (present, positive, n_embd divisible by n_head)
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=model_cfg.n_positions,
            n_embd=model_cfg.n_embd,
            n_layer=model_cfg.n_layer,
            n_head=model_cfg.n_head,
            resid_pdrop=model_cfg.dropout or 0.0,
            embd_pdrop=model_cfg.dropout or 0.0,
            attn_pdrop=model_cfg.dropout or 0.0,
            activation_function=model_cfg.activation or "gelu_new",
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    if model_cfg.activation and model.config.activation_function != model_cfg.activation:
        use_activation(model, model_cfg.activation)
    if block_size > model.config.n_positions:
        raise ConfigError(
            f"train.block_size={block_size} is larger than the model's context "
            f"(n_positions={model.config.n_positions}); set train.block_size={model.config.n_positions} or less"
        )
    model.generation_config.pad_token_id = eos_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = eos_token_id
    return model


def use_activation(model: GPT2LMHeadModel, name: str) -> None:
    """Compute a pretrained model's GELU as ``name``: ``gelu_new`` and ``gelu_pytorch_tanh`` are the same function
    (the tanh form), as five PyTorch ops or one fused op (a slightly faster step; equal up to rounding)."""
    from transformers.activations import ACT2FN

    if model.config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(
            f"model.activation={name}: this model's activation is {model.config.activation_function}, another "
            "function; set model.activation=null to keep it"
        )
    for block in model.transformer.h:
        block.mlp.act = ACT2FN[name]
    model.config.activation_function = name


class LitGPT2(L.LightningModule):
    """GPT-2 language modelling on token windows."""

    def __init__(self, model: GPT2LMHeadModel, train_cfg: schema.Train, bytes_per_token: float | None):
        super().__init__()
        # from_pretrained returns a model in eval mode, and Lightning keeps each module's mode: without this a
        # finetune would run without dropout until the first sample (whose model.train() turns it on)
        model.train()
        self.model = model
        self.cfg = train_cfg
        self.bytes_per_token = bytes_per_token
        self.lora = train_cfg.lora.enabled
        self.strict_loading = (
            not self.lora
        )  # a LoRA checkpoint holds the adapters only (resume_point checked its fingerprint)
        if train_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if train_cfg.freeze_embeddings:  # gpt-2-simple's only_train_transformer_layers
            for p in (model.transformer.wte.weight, model.transformer.wpe.weight):
                p.requires_grad_(False)
        self._val_sum = torch.zeros(())
        self._val_count = 0

    # Exact resume: the checkpoint carries the RNG state (dropout) and the resumed run restores it.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.lora:  # only what trains: a chunked gpt2-xl LoRA run writes megabytes, not 25 GB, a checkpoint
            from penwright.train.lora import trainable_only

            checkpoint["state_dict"] = trainable_only(self, checkpoint["state_dict"])
        checkpoint["penwright_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("penwright_rng")

    def on_train_start(self) -> None:
        if self.trainer.global_step > 0:  # resumed: the restored optimizer holds the old peak lr
            self._apply_configured_lr()
        state = getattr(self, "_rng_to_restore", None)
        if state:
            torch.set_rng_state(state["torch"])
            if state.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
            self._rng_to_restore = None

    def _apply_configured_lr(self) -> None:
        """Make a changed train.lr / weight_decay count after a resume (the schedule function is rebuilt anyway)."""
        lr = self.cfg.lr
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
            for group, factor in zip(
                scheduler.optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
            ):
                group["initial_lr"] = lr
                group["lr"] = lr * factor
                if group["weight_decay"]:
                    group["weight_decay"] = self.cfg.weight_decay

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of a batch of windows; masked windows (``(B, 2, T + 1)``: ids and targets, a
        chat's) count only the targets that are not ``IGNORE`` (a batch with none gives 0, not NaN)."""
        inputs, targets = _split(batch)
        logits = self(inputs)
        flat = logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)
        if batch.dim() == 2 or reduction == "none":
            return F.cross_entropy(*flat, reduction=reduction, ignore_index=IGNORE)
        return F.cross_entropy(*flat, reduction="sum", ignore_index=IGNORE) / (targets != IGNORE).sum().clamp(min=1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            from pathlib import Path

            last = Path(self.cfg.ckpt_dir) / "last.ckpt"
            kept = (
                f"the last good checkpoint is kept: {last}"
                if last.is_file()
                else f"no checkpoint was written yet in {self.cfg.ckpt_dir}"
            )
            raise PenwrightError(
                f"the training loss is {loss.item()} at step {self.global_step}: stopping; {kept}. "
                f"Lower train.lr, or check the data"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log(
            "lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False, rank_zero_only=True
        )  # the lr this step uses
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if torch.cuda.is_available() and self.device.type == "cuda":
            self.log("gpu/peak_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, rank_zero_only=True)

    def on_validation_epoch_start(self):
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        losses = self._loss(batch, reduction="none")
        self._val_sum += losses.double().sum()
        self._val_count += (_split(batch)[1] != IGNORE).sum()

    def on_validation_epoch_end(self):
        total = self.all_gather(self._val_sum).sum()
        count = self.all_gather(self._val_count).sum()
        if count == 0:
            return
        loss = (total / count).float()
        # every rank holds the same gathered value, so callbacks can monitor it on every rank
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        if self.bytes_per_token:
            self.log("val/bpb", loss / math.log(2) / self.bytes_per_token)

    def configure_optimizers(self):
        cfg = self.cfg
        decay: list = []
        no_decay: list = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # matrices decay; biases, LayerNorm gains and position embeddings do not
            (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
        total = int(cfg.decay_steps or self.trainer.max_steps)  # fixed decay_steps: chunked runs share one schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.warmup_steps, total, cfg.schedule, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _split(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch of windows: ``(B, T + 1)`` ids, or ``(B, 2, T + 1)`` ids and masked targets."""
    if batch.dim() == 3:
        return batch[:, 0, :-1], batch[:, 1, 1:]
    return batch[:, :-1], batch[:, 1:]


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    """Multiplier of the peak lr at a step: linear warmup, then cosine / linear decay to ``min_ratio``."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"train.schedule={schedule!r}: use cosine, linear or constant")
    if not 0 <= min_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={min_ratio}: use a ratio in [0, 1]")
    if warmup < 0 or total < 1:
        raise ConfigError(
            f"train.warmup_steps={warmup}, decay over {total} steps: use warmup >= 0 and a positive length"
        )

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
