"""Stage ``generate``: text from the exported model, with gpt-2-simple's controls.

For each prompt (gpt-2-simple's ``prefix``; ``""`` is unconditional), ``nsamples`` samples are
generated ``batch_size`` at a time (the last batch may be smaller: nsamples need not be a
multiple of batch_size). Each text is cut at ``truncate`` (e.g. ``<|endoftext|>``) and keeps the
prompt in front when ``include_prefix``. All samples go to ``destination`` (markdown for ``.md``,
else plain text joined by ``delimiter``, as gpt-2-simple's generate_to_file), written atomically.
A single sample streams to the terminal token by token; bulk generation shows a progress bar.

It runs on the engine ``penwright serve`` runs (``penwright.inference.engine``: continuous batching over
``batch_size`` slots, each sample with its own random stream seeded ``(seed + batch, row)``), for
every graph the export writes and on either provider: the same seed gives the same samples on any.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from penwright.core import schema
from penwright.core.atomic import atomic_write_text
from penwright.core.copy_index import Copies, CopyMeasures, marked, summary
from penwright.core.errors import InvalidValue, config_keys
from penwright.core.log import get_logger
from penwright.generate.score import TextScore, score_texts
from penwright.inference.engine import Engine
from penwright.inference.sampling import SAMPLED, SamplingConfig
from penwright.inference.text import finish_text
from penwright.prepare import copies

log = get_logger("generate").info


@dataclass
class Sample:
    prompt: str
    text: str
    score: TextScore | None = None  # generate.rank: the model's score of the text
    copies: CopyMeasures | None = None  # how much of the generated text is copied from the training split
    marked: str | None = None  # the text with its copied spans between ⟦ and ⟧


def count_copies(samples: list[Sample], prepared: str | Path | copies.Documents) -> dict:
    """How many samples are verbatim copies of corpus documents (short texts: rows), train and val apart.

    gpt-2-simple's users checked by hand whether generated short texts were memorized training rows.
    Whitespace is collapsed on both sides; the row prefix (``<|startoftext|>``) is ignored. The documents
    are the hashes ``prepare`` wrote to ``<data.out_dir>/documents.json`` (``penwright.prepare.copies``), not the corpus.
    """
    documents = prepared if isinstance(prepared, copies.Documents) else copies.read(prepared)
    return documents.count([s.text for s in samples])


def generate_samples(
    gen: Engine,
    prompts: list[str],
    *,
    sampling: SamplingConfig = SAMPLED,
    nsamples: int = 1,
    batch_size: int = 1,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    truncate: str | None = None,
    include_prefix: bool = True,
    strip: bool = False,
    seed: int | None = None,
    stop: list[str] | None = None,
    stream: bool = False,
    progress: bool = True,
) -> list[Sample]:
    """``nsamples`` samples of each prompt, ``batch_size`` at a time, each finished as gpt-2-simple did
    (``truncate``, ``include_prefix``, ``strip``). A value it cannot use is an ``InvalidValue`` naming the
    argument (the stage says which key)."""
    if not prompts:
        raise InvalidValue("prompts", [], 'give at least one prompt ("" for an unconditional sample)')
    for name, value in (("nsamples", nsamples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise InvalidValue(name, value, "must be >= 1")
    longest = max(len(gen.encode(p)) for p in prompts)
    if longest + max_new_tokens > gen.context:
        raise InvalidValue(
            "max_new_tokens",
            max_new_tokens,
            f"with a prompt of {longest} tokens it exceeds the model's context of {gen.context} tokens; "
            "shorten the prompt or lower it",
        )
    jobs = [(p, min(batch_size, nsamples - done)) for p in prompts for done in range(0, nsamples, batch_size)]
    total = len(prompts) * nsamples
    streaming = stream and total == 1
    bar = tqdm(
        total=total, unit="sample", desc="generate", file=sys.stderr, disable=streaming or not progress or total == 1
    )
    stops = [s for s in [*(stop or []), truncate] if s]  # truncate ends a sample where it would be cut anyway
    samples: list[Sample] = []
    for index, (prompt, size) in enumerate(jobs):
        if streaming:  # the prompt, then the text as it grows (the engine holds back what may begin a stop string)
            _show(prompt if include_prefix else "")
        texts = gen.generate(
            [prompt] * size,
            max_new_tokens,
            seed=None if seed is None else seed + index,
            stop_strings=stops,
            on_text=(lambda piece, _: _show(piece)) if streaming else None,
            sampling=sampling,
            min_new_tokens=min_new_tokens,
        )
        samples += [Sample(prompt, finish_text(prompt, text, truncate, include_prefix, strip)) for text in texts]
        bar.update(size)
    bar.close()
    if streaming:
        print()
    return samples


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def shaping(g: schema.Generate) -> dict:
    """``generate``'s keys that shape each sample: its length, its stops, gpt-2-simple's finishing."""
    return {
        "max_new_tokens": g.max_new_tokens,
        "min_new_tokens": g.min_new_tokens,
        "truncate": g.truncate,
        "include_prefix": g.include_prefix,
        "strip": g.strip,
        "stop": list(g.stop),
    }


def refuse_copies(
    gen: Engine, samples: list[Sample], copied: Copies, g: schema.Generate, sampling: SamplingConfig
) -> tuple[list[Sample], dict]:
    """``generate.max_copied_span``: a sample whose longest copied span is longer is drawn again (another seed), up
    to ``generate.copy_retries`` times, then dropped; the counts are reported."""
    limit = g.max_copied_span
    assert limit is not None  # the caller asks only when it is set
    kept, redrawn, dropped = [], 0, 0
    for index, sample in enumerate(samples):
        for attempt in range(g.copy_retries + 1):
            prompt = sample.prompt if sample.prompt and sample.text.startswith(sample.prompt) else ""
            if copied.measure(sample.text[len(prompt) :]).longest <= limit:
                kept.append(sample)
                break
            if attempt == g.copy_retries:
                dropped += 1
                break
            redrawn += 1
            seed = None if g.seed is None else g.seed + 1_000_003 * (attempt + 1) + index
            (sample,) = generate_samples(
                gen, [sample.prompt], sampling=sampling, seed=seed, progress=False, **shaping(g)
            )
    log(
        f"generate.max_copied_span={g.max_copied_span}: {redrawn} redraw(s); {dropped} of {len(samples)} samples "
        f"dropped after {g.copy_retries} redraw(s) each"
    )
    return kept, {"max_copied_span": g.max_copied_span, "redrawn": redrawn, "dropped": dropped}


def measure_copies(copied: Copies, samples: list[Sample]) -> dict:
    """Each sample's copy measures (of the text it generated, the prompt left out) and their summary beside the
    val split's baseline."""
    for s in samples:
        prompt = s.prompt if s.prompt and s.text.startswith(s.prompt) else ""
        s.copies, spans = copied.read(s.text[len(prompt) :])
        s.marked = prompt + marked(s.text[len(prompt) :], spans)
    measured = [s.copies for s in samples if s.copies is not None]
    length = int(statistics.median(m.tokens for m in measured)) if measured else 0
    result = {"min_span": copied.min_span, **summary(measured), "val_baseline": copied.baseline(max(length, 1))}
    base = result["val_baseline"]
    if measured and base:
        log(
            f"copies: longest copied span median {result['longest_tokens_median']} tokens (val text: "
            f"{base['longest_tokens_median']}), tokens in copied spans of >= {copied.min_span}: median "
            f"{result['copied_share_median']:.0%} (val text: {base['copied_share_median']:.0%})"
        )
    return result


def render(samples: list[Sample], markdown: bool, delimiter: str, header: str) -> str:
    if not markdown:
        return delimiter.join(s.text for s in samples) + "\n"
    lines = [f"# {header}", ""]
    for i, s in enumerate(samples, start=1):
        shown = repr(s.prompt) if s.prompt else "(unconditional)"
        score = ""
        if s.score is not None:
            score = f" · {s.score.mean_logprob:.3f} nats/token, {s.score.bits_per_byte:.3f} bits/byte"
        lines += [f"## {i}. prompt: {shown}{score}", ""]
        if s.copies is not None:
            c = s.copies
            where = f" (from {c.source}, token {c.offset})" if c.document is not None else ""
            lines += [
                f"copied: longest span {c.longest} tokens / {c.longest_chars} characters{where}; "
                f"{c.copied_share:.0%} of its {c.tokens} tokens in copied spans of >= {c.min_span} (marked ⟦…⟧)",
                "",
            ]
        lines += ["```text", s.marked if s.marked is not None else s.text, "```", ""]
    return "\n".join(lines)


def sampling_of(g: schema.Generate) -> SamplingConfig:
    """``generate``'s sampling keys as the one object the engine takes."""
    with config_keys("generate"):
        return SamplingConfig(
            do_sample=g.do_sample,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            repetition_penalty=g.repetition_penalty,
        )


def load(g: schema.Generate) -> Engine:
    """The engine ``penwright serve`` runs, with ``batch_size`` slots, on ``generate.graph`` and ``generate.provider``."""
    return Engine.load(g.model_dir, slots=g.batch_size, threads=g.threads, graph=g.graph, provider=g.provider)


def generate(cfg: schema.Config) -> list[Sample]:
    g = cfg.generate
    start = time.perf_counter()
    documents = copies.read(cfg.data.out_dir) if g.check_copies else None  # a missing file stops it before any work
    sampling = sampling_of(g)  # built once, checked before the model loads
    with config_keys("generate", {"slots": "batch_size"}):  # a value the engine refuses, named by its key
        gen = load(g)
        samples = generate_samples(
            gen,
            list(g.prompts),
            sampling=sampling,
            nsamples=g.nsamples,
            batch_size=g.batch_size,
            seed=g.seed,
            **shaping(g),
            stream=g.stream,
        )
    if g.rank:  # best (highest mean logprob) first, on the same engine
        for sample, score in zip(samples, score_texts(gen, [s.text for s in samples])):
            sample.score = score
        samples.sort(key=lambda s: -s.score.mean_logprob if s.score else 0.0)
    seconds = time.perf_counter() - start
    provider = gen.provider
    report = {"samples": len(samples), "provider": provider, "seconds": round(seconds, 2)}
    copied = Copies.open(cfg.data.out_dir, gen.tokenizer, g.copy_min_span) if g.copy_min_span else None
    if copied is not None:
        if g.max_copied_span is not None:
            samples, report["refused_copies"] = refuse_copies(gen, samples, copied, g, sampling)
        report["copies"] = measure_copies(copied, samples)
    if documents is not None:
        report |= count_copies(samples, documents)
        log(
            f"{report['copies_of_train']} of {len(samples)} samples are verbatim training documents "
            f"({report['copies_of_val']} more are validation documents)"
        )
    if g.report:
        atomic_write_text(Path(g.report), json.dumps(report, indent=2) + "\n")
    if g.destination:
        dest = Path(g.destination)
        header = (
            f"{len(samples)} samples from {g.model_dir} on {provider} (temperature {g.temperature}, "
            f"top_k {g.top_k}, top_p {g.top_p}, seed {g.seed})"
        )
        if g.check_copies:
            header += f"; {report['copies_of_train']} are verbatim copies of training documents"
        if g.rank:
            header += "; ranked by the model's mean logprob per token, best first"
        atomic_write_text(dest, render(samples, dest.suffix == ".md", g.delimiter, header))
        log(f"{len(samples)} samples in {seconds:.1f} s on {provider} -> {dest}")
    elif not (g.stream and len(samples) == 1):  # a single streamed sample is on the screen already
        for s in samples:
            print(s.text, end=g.delimiter)
    return samples
