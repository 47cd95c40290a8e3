"""Text samples while training: every ``sample.every_n_steps`` steps and at the end, on rank 0 only.

Each time: the configured prompts, unconditional samples (from ``<|endoftext|>``) and random
prompts cut from the validation text, at each temperature, with the model's KV cache in eval
mode. They go to a NEW W&B table under one key (``samples``) and to
``reports/samples/step-NNNNNN.md``. Sampling runs under its own seed inside ``torch.random.fork_rng``,
so the training RNG (dropout) is untouched: losses are the same with sampling on or off.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

from penwright import schema
from penwright.fsutil import atomic_write_text


class SampleCallback(L.Callback):
    def __init__(self, cfg: schema.Sample, tokenizer, prompt_source: np.ndarray, out_dir: str | Path):
        self.cfg, self.every, self.temperatures = cfg, cfg.every_n_steps, list(cfg.temperatures)
        self.tokenizer = copy.deepcopy(tokenizer)  # padded on the left here; the tokenizer train saves stays as it was
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.out_dir = Path(out_dir)
        self.prompts = self._prompts(prompt_source)
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
                ids = [int(t) for t in source[start:start + length]]
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
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
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
        return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=False) for row in out]

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
        self._write_markdown(step, rows)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B: a new table each time, under one key
                logger.log_table(key="samples", columns=["step", "kind", "prompt", "temperature", "text"],
                                 data=rows, step=step)
        print(f"[samples] step {step}: {len(rows)} samples -> {self.out_dir}/step-{step:06d}.md", file=sys.stderr)

    def _write_markdown(self, step: int, rows: list) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"# Samples at step {step}", ""]
        for temperature in self.temperatures:
            lines += [f"## temperature {temperature}", ""]
            for _, kind, prompt, temp, text in rows:
                if temp != temperature:
                    continue
                shown = "(unconditional)" if kind == "unconditional" else prompt.replace("\n", " ")
                lines += [f"**{kind}:** {shown}", "", "```text", (prompt if kind != "unconditional" else "") + text, "```", ""]
        atomic_write_text(self.out_dir / f"step-{step:06d}.md", "\n".join(lines))
