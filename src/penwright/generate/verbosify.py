"""Verbosify: expand a document passage by passage, without changing what it says.

For each passage (``sentences`` sentences of the document), a working copy of the model is
finetuned on that passage alone for ``steps`` steps (one, by default: what the seed found best),
then samples ``candidates`` continuations with the passage as the prompt (temperature 0.8,
top-k 40). Each continuation is cut to whole sentences; the likeliest one under the tuned model is
kept. The expanded document is every passage, verbatim, followed by its continuation.

The per-passage models never touch the disk (gpt-2-simple saved ~500 MB a passage): one working
model is reset to the base weights, held in memory, before each passage.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from penwright.core import schema
from penwright.core.atomic import atomic_write_text
from penwright.core.errors import ConfigError, PenwrightError
from penwright.core.log import get_logger

SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


log = get_logger("verbosify").info


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after . ! ? and closing quotes), whitespace collapsed."""
    flat = " ".join(text.split())
    return [s for s in (p.strip() for p in SENTENCE_END.split(flat)) if s] if flat else []


def passages(text: str, sentences: int) -> list[tuple[int, str]]:
    """``(paragraph, passage)``: each paragraph (blank-line separated) cut into passages of ``sentences``
    sentences (a paragraph's last passage may be shorter; a passage never spans two paragraphs)."""
    if sentences < 1:
        raise ConfigError(f"verbosify.sentences={sentences}: use 1 or more sentences a passage")
    result = []
    for number, paragraph in enumerate(p for p in re.split(r"\n\s*\n", text) if p.strip()):
        parts = split_sentences(paragraph)
        result += [(number, " ".join(parts[i : i + sentences])) for i in range(0, len(parts), sentences)]
    return result


def whole_sentences(text: str, limit: int) -> str:
    """The first ``limit`` complete sentences of a continuation ("" when it completes none)."""
    flat = " ".join(text.split())
    ends = [m.start() for m in re.finditer(r"[.!?](?=[\"')\]]*(\s|$))", flat)]
    if not ends:
        return ""
    cut = ends[min(limit, len(ends)) - 1] + 1
    while cut < len(flat) and flat[cut] in "\"')]":
        cut += 1
    return flat[:cut].strip()


@dataclass
class Expansion:
    paragraph: int
    passage: str
    continuation: str  # "" when no candidate completed a sentence
    logprob: float | None


class Verbosifier:
    """One base model in memory, one working copy reset to it before each passage."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import AutoTokenizer, GPT2LMHeadModel

        from penwright.core.hub import load_pretrained

        self.model = load_pretrained(model_dir, GPT2LMHeadModel.from_pretrained, "model", "verbosify.model").to(device)
        self.tokenizer = load_pretrained(model_dir, AutoTokenizer.from_pretrained, "tokenizer", "verbosify.model")
        self.device = device
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}  # never written to disk
        self.n_positions = int(self.model.config.n_positions)

    def reset(self) -> None:
        self.model.load_state_dict(self.base)

    def finetune(self, ids: torch.Tensor, steps: int, lr: float) -> float:
        """``steps`` AdamW steps on the passage alone; returns the last loss."""
        self.model.train()
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return float(loss.detach())

    @torch.no_grad()
    def continue_passage(
        self,
        ids: torch.Tensor,
        candidates: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        max_sentences: int,
    ) -> tuple[str, float | None]:
        """Sample ``candidates`` continuations; keep whole sentences; return the likeliest."""
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            num_return_sequences=candidates,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        best, best_score = "", None
        for row in out[:, ids.shape[1] :]:
            text = whole_sentences(self.tokenizer.decode(row, skip_special_tokens=True), max_sentences)
            if not text:
                continue
            score = self.mean_logprob(ids, " " + text)
            if best_score is None or score > best_score:
                best, best_score = text, score
        return best, best_score

    @torch.no_grad()
    def mean_logprob(self, prompt: torch.Tensor, text: str) -> float:
        cont = torch.tensor([self.tokenizer.encode(text)], device=self.device)
        ids = torch.cat([prompt, cont], dim=1)[:, -self.n_positions :]
        logits = self.model(input_ids=ids).logits[0, -cont.shape[1] - 1 : -1].float()
        return float(torch.log_softmax(logits, -1).gather(1, ids[0, -cont.shape[1] :, None]).mean())


def expand(v: Verbosifier, text: str, cfg: schema.Verbosify, progress: bool = True) -> list[Expansion]:
    """Every passage of ``text`` with its chosen continuation."""
    steps, candidates = cfg.steps, cfg.candidates
    max_new = cfg.max_new_tokens
    if max_new >= v.n_positions:
        raise ConfigError(
            f"verbosify.max_new_tokens={max_new}: the model's context is {v.n_positions} tokens; "
            f"leave room for the passage"
        )
    chunks = passages(text, cfg.sentences)
    result = []
    for index, (paragraph, passage) in enumerate(
        tqdm(chunks, desc="verbosify", unit="passage", disable=not progress, file=sys.stderr)
    ):
        if words(passage) < cfg.min_words:  # a heading, a signature: kept as it is
            result.append(Expansion(paragraph, passage, "", None))
            continue
        ids = v.tokenizer.encode(passage)[-(v.n_positions - max_new) :]  # the passage's end, if it is too long
        ids = torch.tensor([ids], device=v.device)
        torch.manual_seed(cfg.seed + index)
        v.reset()
        if steps:
            v.finetune(ids, steps, cfg.lr)
        continuation, score = v.continue_passage(
            ids, candidates, max_new, cfg.temperature, cfg.top_k, cfg.max_sentences
        )
        result.append(Expansion(paragraph, passage, continuation, score))
    v.reset()
    return result


def words(text: str) -> int:
    return len(text.split())


def verbosify(cfg: schema.Config) -> dict:
    """The ``verbosify`` command/stage: expand ``verbosify.document`` into ``verbosify.output``."""
    vc = cfg.verbosify
    start = time.perf_counter()
    doc = Path(vc.document)
    if not doc.is_file():
        raise PenwrightError(f"verbosify.document={doc}: no such file. Give a text file to expand")
    try:
        text = doc.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PenwrightError(f"{doc}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if not split_sentences(text):
        raise PenwrightError(f"{doc}: the document is empty; give a text to expand")
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    v = Verbosifier(vc.model, device)
    expansions = expand(v, text, vc)
    paragraphs: dict[int, list[str]] = {}
    for e in expansions:
        paragraphs.setdefault(e.paragraph, []).append(f"{e.passage} {e.continuation}".strip())
    expanded = "\n\n".join(" ".join(p) for p in paragraphs.values()) + "\n"
    original = sum(words(e.passage) for e in expansions)
    report = {
        "passages": len(expansions),
        "expanded_passages": sum(bool(e.continuation) for e in expansions),
        "words_in": original,
        "words_out": words(expanded),
        "word_ratio": round(words(expanded) / max(1, original), 3),
        "device": device,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = atomic_write_text(Path(vc.output), expanded)
    atomic_write_text(Path(vc.report), json.dumps(report, indent=2) + "\n")
    log(
        f"{report['passages']} passages ({report['expanded_passages']} expanded), {report['words_in']} -> "
        f"{report['words_out']} words (x{report['word_ratio']}) on {device} in {report['seconds']} s -> {out}"
    )
    return report
