"""Two chained models (writing prompts): one makes prompts, the other answers each of them.

``penwright chain`` (dvc: the ``pairs`` stage of ``pipelines/writing_prompts/dvc.yaml``) generates
``chain.n`` prompts with the prompts model (rows ``<|startoftext|>prompt<|endoftext|>``), then feeds
each to the responses model as the prefix ``<|startoftext|>[WP] prompt [RESPONSE]`` (the record
format it learned) and writes the prompt/response pairs to ``chain.output``. Both run on the
exported ONNX models on penwright's engine (``penwright.inference.engine``), ``chain.batch_size`` slots each.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from penwright.core.atomic import atomic_write_text
from penwright.core.errors import ConfigError, config_keys
from penwright.core.log import get_logger
from penwright.core.schema import Config
from penwright.inference.engine import Engine
from penwright.inference.sampling import SamplingConfig
from penwright.inference.text import finish_text
from penwright.prepare.tokenizer import BOS_TEXT, EOS

WP, RESPONSE = "[WP]", "[RESPONSE]"


def response_prefix(prompt: str) -> str:
    return f"{BOS_TEXT}{WP} {prompt} {RESPONSE}"


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _texts(
    gen: Engine,
    prefixes: list[str],
    max_new_tokens: int,
    batch_size: int,
    seed: int | None,
    stops: list[str],
    bar,
    sampling: SamplingConfig,
    min_new_tokens: int,
    retries: int = 3,
) -> list[str]:
    """One finished text per prefix; a row that came out empty is sampled again (new seed), ``retries`` times."""
    texts = [""] * len(prefixes)
    for attempt in range(retries + 1):
        todo = [i for i, t in enumerate(texts) if not t]
        for index, rows in enumerate(_batches(todo, batch_size)):
            step_seed = None if seed is None else seed + 1000 * attempt + index
            out = gen.generate(
                [prefixes[i] for i in rows],
                max_new_tokens,
                seed=step_seed,
                stop_strings=stops,
                sampling=sampling,
                min_new_tokens=min_new_tokens,
            )
            for i, text in zip(rows, out):
                texts[i] = finish_text("", text, EOS, include_prefix=False, strip=True)
            bar.update(sum(bool(texts[i]) for i in rows))
        if all(texts):
            break
    return texts


def make_pairs(
    prompt_gen: Engine,
    response_gen: Engine,
    n: int,
    *,
    sampling: SamplingConfig,
    batch_size: int = 4,
    prompt_tokens: int = 40,
    response_tokens: int = 160,
    min_new_tokens: int = 0,
    seed: int | None = 4,
    progress: bool = True,
) -> list[dict]:
    """``n`` prompts from ``prompt_gen``, each answered by ``response_gen``: ``[{"prompt", "response"}]``.

    A prompt or response that comes out empty (the model ended it at once, or it began with a
    marker) is sampled again; pairs still missing a half after that are left out, and said so.
    """
    bar = tqdm(total=2 * n, unit="text", desc="chain", file=sys.stderr, disable=not progress)
    prompts = _texts(
        prompt_gen,
        [BOS_TEXT] * n,
        prompt_tokens,
        batch_size,
        seed,
        [BOS_TEXT, RESPONSE, WP],
        bar,
        sampling,
        min_new_tokens,
    )
    prompts = [p for p in prompts if p]
    responses = _texts(
        response_gen,
        [response_prefix(p) for p in prompts],
        response_tokens,
        batch_size,
        None if seed is None else seed + 1,
        [BOS_TEXT, WP, RESPONSE],
        bar,
        sampling,
        min_new_tokens,
    )
    bar.close()
    pairs = [{"prompt": p, "response": r} for p, r in zip(prompts, responses) if r]
    if len(pairs) < n:
        get_logger("chain").info(f"{n - len(pairs)} of {n} pairs left out: a half stayed empty after retries")
    return pairs


def render(pairs: list[dict], markdown: bool, header: str) -> str:
    if not markdown:
        return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    lines = [f"# {header}", ""]
    for i, p in enumerate(pairs, start=1):
        lines += [f"## {i}. {WP} {p['prompt']}", "", f"{RESPONSE} {p['response']}", ""]
    return "\n".join(lines)


def chain(cfg: Config) -> list[dict]:
    c = cfg.chain
    if c is None:
        raise ConfigError(
            "chain: no chain settings in this config; run with experiment=wp_responses (or add a chain block)"
        )
    start = time.perf_counter()
    threads = c.threads
    prompt_gen = Engine.load(c.prompts_model, slots=c.batch_size, threads=threads)
    response_gen = Engine.load(c.responses_model, slots=c.batch_size, threads=threads)
    with config_keys("chain"):
        sampling = SamplingConfig(do_sample=True, temperature=c.temperature, top_k=c.top_k)
        pairs = make_pairs(
            prompt_gen,
            response_gen,
            c.n,
            sampling=sampling,
            batch_size=c.batch_size,
            prompt_tokens=c.prompt_tokens,
            response_tokens=c.response_tokens,
            min_new_tokens=c.min_new_tokens,
            seed=c.seed,
        )
    out = Path(c.output)
    header = (
        f"{len(pairs)} writing prompts from {c.prompts_model}, answered by {c.responses_model} "
        f"(temperature {c.temperature}, top_k {c.top_k}, seed {c.seed})"
    )
    atomic_write_text(out, render(pairs, out.suffix != ".jsonl", header))
    get_logger("chain").info(
        f"{len(pairs)} prompt/response pairs in {time.perf_counter() - start:.1f} s on {prompt_gen.provider} -> {out}"
    )
    return pairs
