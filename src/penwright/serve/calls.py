"""One OpenAI completion call on the engine: checked, fanned out into engine requests, answered as JSON or SSE.

``CompletionCall`` is what the ``/v1/completions`` route runs (the route only reads the body): the checks that
need the model and the server's limits (each a 400 naming the field), one ``engine.Request`` per choice (``n``
of them per prompt, or ``best_of`` ranked by mean logprob), a ``Job`` carrying their text from the engine's
thread, and the answer: one JSON object, or server-sent events as the text grows then ``data: [DONE]``. The
shape of a choice and of a streamed chunk are its two methods ``choice_json`` and ``chunk_json``, so a call
with another answer shape (chat) is a subclass that builds its prompt and overrides those two.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from fastapi.responses import StreamingResponse

from penwright.inference.engine import Engine, Request
from penwright.serve.deps import ApiError, Served, check_fits, error_body, sampling_for
from penwright.serve.jobs import Job


class CompletionCall:
    """A checked completion request and its engine requests. ``body``: a ``CompletionBody`` (or a body with the
    same sampling and limit fields); ``texts`` / ``encoded``: its prompts as text and token ids."""

    object = "text_completion"
    chunk_object = "text_completion"  # a streamed event's object
    id_prefix = "cmpl"

    def __init__(
        self, served: Served, body: Any, texts: list[str] | None = None, encoded: list[list[int]] | None = None
    ):
        self.served, self.body = served, body
        self.model, self.engine = served.engine(body.model)
        self.show_copies = getattr(body, "copies", False)
        self.max_copied_span = getattr(body, "max_copied_span", None)
        if self.max_copied_span is not None and body.stream:
            raise ApiError(
                400,
                "max_copied_span cannot be streamed (a choice over it is drawn again, and sent text cannot be taken "
                "back): stream=false",
                "max_copied_span",
            )
        asking = "max_copied_span" if self.max_copied_span is not None else "copies" if self.show_copies else None
        self.copies = served.copies(self.model, self.engine, asking) if asking else None
        self.redrawn: dict[int, int] = {}  # id(request) -> how many times its choice was drawn again
        settings = served.settings
        self.check_unsupported()
        if body.n > settings.max_n:
            raise ApiError(400, f"n={body.n}: at most {settings.max_n} (serve.max_n)", "n")
        best_of = body.n if body.best_of is None else body.best_of
        if best_of < body.n:
            raise ApiError(400, f"best_of={best_of}: must be >= n ({body.n})", "best_of")
        if best_of > settings.max_n:
            raise ApiError(400, f"best_of={best_of}: at most {settings.max_n} (serve.max_n)", "best_of")
        if best_of > body.n and body.stream:
            raise ApiError(
                400, "best_of > n cannot be streamed (the best are known at the end): stream=false", "best_of"
            )
        if body.logprobs is not None and body.logprobs > settings.max_logprobs:
            raise ApiError(
                400, f"logprobs={body.logprobs}: at most {settings.max_logprobs} (serve.max_logprobs)", "logprobs"
            )
        self.best_of = best_of
        if encoded is None:
            texts, encoded = prompts_of(self.engine, body.prompt)
        assert texts is not None  # (a caller that gives the ids gives their texts too)
        self.texts, self.encoded = texts, encoded
        if len(encoded) * best_of > settings.max_prompts:
            raise ApiError(
                400,
                f"{len(encoded)} prompts x {'best_of' if best_of > body.n else 'n'}={best_of}: at most "
                f"{settings.max_prompts} choices (serve.max_prompts)",
                "prompt",
            )
        bias = logit_bias_of(self.engine, body.logit_bias)
        sampling = sampling_for(
            settings.temperature if body.temperature is None else body.temperature,
            settings.top_k if body.top_k is None else max(0, body.top_k),
            settings.top_p if body.top_p is None else body.top_p,
            body.repetition_penalty or 1.0,
        )
        max_tokens = settings.max_tokens if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise ApiError(
                400, "max_tokens=0 asks for nothing: it needs echo=true (score the prompt alone)", "max_tokens"
            )
        self.score_prompt = body.echo and (body.logprobs is not None or max_tokens == 0)
        for ids in encoded:
            check_fits(self.engine, ids, max_tokens, scoring=self.score_prompt)
        logprobs = body.logprobs if body.logprobs is not None or best_of == body.n else 0  # best_of ranks by them

        def request(k: int, draw: int = 0) -> Request:
            """Choice ``k``'s engine request (``draw`` > 0: drawn again, with a seed of its own)."""
            seed = None if body.seed is None else body.seed + k + 1_000_003 * draw
            return Request(
                encoded[k // best_of],
                max_tokens,
                sampling,
                min_tokens=min(body.min_tokens, max_tokens),
                stop=tuple(body.stop or ()),
                seed=seed,
                logprobs=logprobs,
                score_prompt=self.score_prompt,
                logit_bias=bias,
            )

        self.request = request
        self.requests = [request(k) for k in range(len(encoded) * best_of)]
        self.job = Job(self.engine, self.requests, settings, served.metrics, self.model)
        self.head = {
            "id": f"{self.id_prefix}-{uuid.uuid4().hex[:24]}",
            "object": self.object,
            "created": int(time.time()),
            "model": self.model,
        }
        # echo: the prompt as its tokens read (an empty prompt is <|endoftext|>: the offsets index this text)
        shown = [t or self.engine.decode(ids) for t, ids in zip(texts, encoded)]
        self.prefix = [shown[k // best_of] if body.echo else "" for k in range(len(self.requests))]
        self.sent = [0] * len(self.requests)  # per choice: scored tokens sent so far, and their text's length
        self.offsets = [0] * len(self.requests)
        h = self.head  # every streamed event starts the same, up to its choice: built once a call
        self.stream_prefix = (
            f'data: {{"id":{json.dumps(h["id"])},"object":{json.dumps(self.chunk_object)},"created":{h["created"]},'
            f'"model":{json.dumps(h["model"])},"choices":['
        )

    def check_unsupported(self) -> None:
        """Fields OpenAI defines that change the answer and that penwright cannot honour: refused, not ignored."""
        body = self.body
        if getattr(body, "suffix", None) is not None:
            raise ApiError(400, "suffix is not supported by penwright's server", "suffix")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name, None) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)", name)

    # -- the answer ----------------------------------------------------------------------------------

    async def respond(self):
        """The whole answer (a dict FastAPI sends as JSON), or the event stream."""
        if not self.body.stream:
            return await self.answer()
        self.job.start()
        return StreamingResponse(
            self.events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.encoded)
        done = sum(len(r.tokens) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def scores(self, r: Request, start: int = 0) -> list:
        """The choice's scored tokens from ``start`` on (the prompt's first, when it is scored)."""
        return ((r.prompt_scores if self.score_prompt else []) + r.scores)[start:]

    def picked(self) -> list[Request]:
        """The requests answered: all of them, or per prompt the ``n`` of highest mean logprob of ``best_of``,
        best first (a tie keeps the earlier)."""
        n, best_of = self.body.n, self.best_of
        if best_of == n:
            return self.requests
        out = []
        for i in range(len(self.encoded)):
            group = self.requests[i * best_of : (i + 1) * best_of]
            out += sorted(group, key=mean_logprob, reverse=True)[:n]
        return out

    async def answer(self) -> dict:
        await self.job.wait()
        if self.max_copied_span is not None:
            await self.refuse_copies()
        choices = [self.choice_json(k, r) for k, r in enumerate(self.picked())]
        return {**self.head, "choices": choices, "usage": self.usage()}

    def choice_json(self, index: int, r: Request) -> dict:
        """A whole choice: OpenAI's completion shape (text, index, logprobs, finish_reason)."""
        prefix = self.prefix[self.requests.index(r)]
        lp = logprobs_json(self.engine, self.scores(r), 0)[0] if self.body.logprobs is not None else None
        choice = {"text": prefix + r.text, "index": index, "logprobs": lp, "finish_reason": r.finish_reason}
        return choice | self.copies_json(r, len(prefix))

    async def refuse_copies(self) -> None:
        """``max_copied_span``: a choice whose longest copied span is longer is drawn again (another seed), all such
        choices together, up to ``copy_retries`` times; one still over it is answered empty, with finish_reason
        ``content_filter`` (OpenAI's reason for withheld text). Each choice's redraws go in its ``copies``."""
        assert self.copies is not None and self.max_copied_span is not None
        limit, retries = self.max_copied_span, self.body.copy_retries
        for draw in range(1, retries + 2):
            over = [k for k, r in enumerate(self.requests) if self.copies.measure(r.text).longest > limit]
            if not over:
                return
            if draw > retries:
                for k in over:
                    r = self.requests[k]
                    r.text, r.tokens, r.scores, r.finish_reason = "", [], [], "content_filter"
                return
            again = {k: self.request(k, draw) for k in over}
            for k, fresh in again.items():
                self.redrawn[id(fresh)] = self.redrawn.get(id(self.requests[k]), 0) + 1
            self.job = Job(self.engine, list(again.values()), self.served.settings, self.served.metrics, self.model)
            await self.job.wait()
            for k, fresh in again.items():
                self.requests[k] = fresh

    def copies_json(self, r: Request, offset: int = 0) -> dict:
        """``{"copies": ...}`` when the request asked (``copies`` or ``max_copied_span``): the measures of the
        generated text (``core.copy_index``) and its copied spans as ``[start, end)`` character ranges of the
        choice's text (after ``offset`` echoed ones); with ``max_copied_span``, how many times it was redrawn."""
        if self.copies is None:
            return {}
        measures, spans = self.copies.read(r.text)
        out = {**measures.as_dict(), "spans": [[a + offset, b + offset] for a, b in spans]}
        if self.max_copied_span is not None:
            out["redrawn"] = self.redrawn.get(id(r), 0)
        return {"copies": out}

    def scored_since(self, k: int) -> list:
        """The tokens of choice ``k`` scored since its last chunk (the engine scores, then emits)."""
        entries = self.scores(self.requests[k], self.sent[k])
        self.sent[k] += len(entries)
        return entries

    def logprobs_since(self, k: int) -> dict | None:
        """``scored_since`` as OpenAI's logprobs object; None when the request asked for none."""
        if self.body.logprobs is None:
            return None
        lp, self.offsets[k] = logprobs_json(self.engine, self.scored_since(k), self.offsets[k])
        return lp

    def chunk_json(self, k: int, text: str, reason: str | None) -> str:
        """One streamed event of choice ``k``: its new text (behind the echoed prompt in its first chunk)."""
        if self.echo_pending[k]:
            text, self.echo_pending[k] = self.prefix[k] + text, False
        lp = json.dumps(self.logprobs_since(k), ensure_ascii=False)
        copies = self.copies_json(self.requests[k], len(self.prefix[k])) if reason is not None else {}
        extra = f',"copies":{json.dumps(copies["copies"])}' if copies else ""  # with the choice's last chunk
        return (
            f'{self.stream_prefix}{{"text":{json.dumps(text, ensure_ascii=False)},'
            f'"index":{k},"logprobs":{lp},"finish_reason":{json.dumps(reason)}{extra}}}]}}\n\n'
        )

    def opening_chunks(self) -> list[str]:
        """Events before the first piece of text: the echoed prompt when it is not scored (a scored prompt goes
        with its logprobs after the prefill)."""
        if self.body.echo and not self.score_prompt:
            return [self.chunk_json(k, "", None) for k in range(len(self.requests))]
        return []

    async def events(self):
        """One event per choice per engine step; when the client reads slower than the engine writes, pieces
        already waiting are merged into one event (fewer, larger chunks: the same text)."""
        self.echo_pending = [bool(p) for p in self.prefix]
        try:
            for event in self.opening_chunks():
                yield event
            async for pieces in self.job.batches():
                failed = [reason for _, _, reason in pieces if reason in ("timeout", "error")]
                if failed:
                    yield sse(error_body(self.job.message(failed[0]), kind="server_error"))
                    break
                merged: dict[int, list] = {}
                for k, text, reason in pieces:
                    entry = merged.setdefault(k, ["", None])
                    entry[0] += text
                    entry[1] = reason or entry[1]
                yield "".join(self.chunk_json(k, text, reason) for k, (text, reason) in merged.items())
            if (self.body.stream_options or {}).get("include_usage"):
                yield sse({**self.head, "object": self.chunk_object, "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the slots at the next step
            self.job.cancel()


# -- the parts of a body that need the model ------------------------------------------------------------


def mean_logprob(r: Request) -> float:
    """A choice's mean logprob a token (``best_of`` ranks by it; a choice with no tokens scores 0, one withheld
    for its copies ranks last)."""
    if r.finish_reason == "content_filter":
        return -math.inf
    return sum(s.logprob or 0.0 for s in r.scores) / max(1, len(r.scores))


def prompts_of(engine: Engine, prompt) -> tuple[list[str], list[list[int]]]:
    """A completion's prompts as (text, token ids) pairs: a string, strings, token ids, or lists of them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list: give a string, strings, token ids or lists of them", "prompt")
    if isinstance(prompt[0], str):
        return list(prompt), [engine.encode(p) for p in prompt]
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    for i, ids in enumerate(lists):
        where = "prompt" if lists is not prompt else f"prompt[{i}]"
        if not ids:
            raise ApiError(400, f"{where} is an empty list of token ids", "prompt")
        bad = next((j for j, t in enumerate(ids) if not 0 <= t < engine.vocab), None)
        if bad is not None:
            raise ApiError(
                400,
                f"{where}[{bad}]={ids[bad]}: not a token id of this model (0 to {engine.vocab - 1})",
                "prompt",
            )
    return [engine.decode(ids) for ids in lists], [list(ids) for ids in lists]


def logit_bias_of(engine: Engine, bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < engine.vocab:
            raise ApiError(
                400, f"logit_bias: {key!r} is not a token id of this model (0 to {engine.vocab - 1})", "logit_bias"
            )
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias[{key!r}]={value}: must be in -100..100", "logit_bias")
        out[token] = float(value)
    return out


def logprobs_json(engine: Engine, entries: list, offset: int) -> tuple[dict, int]:
    """OpenAI's legacy ``logprobs`` object for scored tokens whose text starts at ``offset`` in the choice's
    text; ``top_logprobs`` holds the most likely tokens and the chosen one. Returns it and the next offset."""
    texts = engine.token_texts([e.token for e in entries])
    offsets: list[int] = []
    top: list[dict[str, float] | None] = []
    for e, text in zip(entries, texts):
        offsets.append(offset)
        offset += len(text)
        if e.logprob is None:
            top.append(None)
            continue
        pairs: dict[str, float] = {}
        for piece, lp in zip(engine.token_texts([t for t, _ in e.top]), (lp for _, lp in e.top)):
            pairs.setdefault(piece, lp)  # tokens of the same text (pieces of characters): the most likely one's
        pairs.setdefault(text, e.logprob)
        top.append(pairs)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }, offset


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
