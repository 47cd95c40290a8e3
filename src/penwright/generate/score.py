"""Scoring texts by the model's own likelihood, on the engine ``generate`` and ``serve`` run.

A text is scored as a document: ``<|endoftext|>`` in front, so its every token is predicted. Its score is
the mean logprob per token (nats; higher is more what the model would write) and bits per byte (the
total surprise over the text's UTF-8 size; lower is better, and comparable across tokenizers). A text
longer than the context is scored in windows, each starting on the last token of the one before.

``penwright score FILE`` ranks the samples of a file ``generate`` wrote (markdown's text blocks, or plain
text split by the delimiter) best first, and writes ``FILE.scores.jsonl``; ``generate.rank=true`` does
the same to the samples it generates.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from penwright.core.atomic import atomic_write_text
from penwright.core.copy_index import CLOSE, OPEN, Copies
from penwright.core.errors import PenwrightError
from penwright.core.log import get_logger
from penwright.inference.engine import Engine, Request
from penwright.inference.sampling import GREEDY

DELIMITER = "\n====================\n"  # gpt-2-simple's sample_delim, generate.delimiter's default


@dataclass
class TextScore:
    text: str
    tokens: int
    mean_logprob: float  # nats per token
    bits_per_byte: float


def score_texts(engine: Engine, texts: list[str]) -> list[TextScore]:
    """Each text's score, all texts' windows queued at once (each a prompt scored alone, no new tokens)."""
    windows: list[tuple[int, Request]] = []
    for i, text in enumerate(texts):
        ids = [engine.eos] + engine.tokenizer.encode(text, add_special_tokens=False)
        step = engine.context - 1
        for start in range(1, max(2, len(ids)), step):  # window: one token of context, then up to step scored
            window = ids[start - 1 : start + step]
            windows.append((i, Request(window, 0, GREEDY, logprobs=0, score_prompt=True)))
    for _, request in windows:
        engine.submit(request)
    while engine.step() or not engine.waiting.empty():
        pass
    totals = [0.0] * len(texts)  # per text: its tokens' logprobs summed, and how many
    counts = [0] * len(texts)
    for i, request in windows:
        scored = request.prompt_scores[1:]  # (every token after the first has a logprob)
        totals[i] += sum(s.logprob or 0.0 for s in scored)
        counts[i] += len(scored)
    return [
        TextScore(
            text,
            n,
            total / n if n else -math.inf,  # an empty text: nothing to score, ranked last
            -total / math.log(2) / len(text.encode("utf-8")) if n else math.inf,
        )
        for text, total, n in zip(texts, totals, counts)
    ]


def read_samples(path: Path, delimiter: str = DELIMITER) -> list[str]:
    """The samples of a file ``generate`` wrote: a ``.md`` file's ```text blocks, else the text split by
    ``delimiter`` (blank pieces dropped)."""
    try:
        text = path.read_bytes().decode("utf-8")  # as written: a sample's "\r" stays
    except FileNotFoundError:
        raise PenwrightError(f"{path}: not found; give a file of samples (penwright generate writes them)") from None
    except UnicodeDecodeError as err:
        raise PenwrightError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".md":  # (generate marks copied spans ⟦…⟧ there: the marks are not the sample's)
        samples = [
            t.replace(OPEN, "").replace(CLOSE, "")
            for t in re.findall(r"^```text\n(.*?)\n```$", text, flags=re.S | re.M)
        ]
    else:
        samples = [s for s in text.split(delimiter) if s.strip()]
    if not samples:
        raise PenwrightError(
            f"{path}: no samples found ({'no ```text blocks' if path.suffix == '.md' else f'nothing between {delimiter!r}'})"
        )
    return samples


def score_file(
    path: str | Path,
    model_dir: str | Path = "artifacts/onnx",
    graph: str = "model.onnx",
    delimiter: str = DELIMITER,
    output: str | Path | None = None,
    threads: int = 0,
    prepared: str | Path | None = None,
    min_span: int = 12,
) -> list[TextScore]:
    """Score the samples in ``path`` and write them, best (highest mean logprob) first, as JSON lines; with the
    ``prepared`` folder of the model's corpus, each also gets its copy measures (``core.copy_index``)."""
    path = Path(path)
    samples = read_samples(path, delimiter)
    engine = Engine.load(model_dir, slots=8, threads=threads, graph=graph)
    scores = sorted(score_texts(engine, samples), key=lambda s: -s.mean_logprob)
    out = Path(output) if output else path.with_name(path.name + ".scores.jsonl")
    copies = Copies.open(prepared, engine.tokenizer, min_span) if prepared else None
    rows = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(s).items()}
        | ({"copies": copies.measure(s.text).as_dict()} if copies else {})
        for s in scores
    ]
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))  # empty: null
    log = get_logger("score").info
    for rank, s in enumerate(scores[:5], start=1):
        first = s.text.strip().splitlines()[0][:60] if s.text.strip() else ""
        log(f"{rank}. {s.mean_logprob:.3f} nats/token, {s.bits_per_byte:.3f} bits/byte: {first!r}")
    log(f"{len(scores)} samples scored, best first -> {out}")
    return scores
