"""OpenAI's API on the engine: ``POST /v1/completions`` and ``GET /v1/models``, with vLLM's tokenizer routes.

``/v1/completions`` is OpenAI's completions API (``stream`` for server-sent events), plus vLLM's and
llama.cpp's ``top_k``, ``repetition_penalty`` and ``min_tokens``; prompts as text or token ids; scoring as
vLLM serves it (``logprobs``, ``echo``, ``max_tokens: 0``), ``logit_bias``, ``best_of``: what
lm-evaluation-harness's ``local-completions`` sends. ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info`` are vLLM's (lm-evaluation-harness's ``tokenizer_backend=remote`` reads them).
Each choice is one ``engine.Request``; a ``Job`` carries their text from the engine's thread.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from penwright.inference.engine import Engine, Request
from penwright.serve import openapi as oa
from penwright.serve.deps import ApiError, ServedDep, check_fits, error_body, read_body, sampling_for
from penwright.serve.jobs import Job

router = APIRouter()


# -- request bodies ---------------------------------------------------------------------------------


class CompletionBody(BaseModel):
    """OpenAI's completion request, as vLLM serves it: a prompt as text or token ids (one or a list), scoring
    (``logprobs``, ``echo``, ``max_tokens: 0``), ``logit_bias`` and ``best_of``. Fields it defines that change
    the answer and that penwright cannot honour (suffix, frequency and presence penalties) are refused rather
    than ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, the prompt alone (scored, with logprobs)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    stream: bool = False
    echo: bool = False
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 = all tokens
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # (smaller ones overflow fp32 logits)
    min_tokens: int = Field(0, ge=0)
    stream_options: dict | None = None
    user: str | None = None
    logprobs: int | None = Field(None, ge=0)  # the N most likely tokens beside each token's own logprob
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)  # generate best_of per prompt, return the n of highest mean logprob
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias, -100..100
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings (got {len(stops)})")
        return [s for s in stops if s]


class TokenizeBody(BaseModel):
    """vLLM's ``POST /tokenize`` (the completion form): text -> token ids."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # GPT-2's tokenizer adds none either way


class DetokenizeBody(BaseModel):
    """vLLM's ``POST /detokenize``: token ids -> text."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class ModelQuery(BaseModel):
    model: str | None = None  # a name /v1/models lists (none: the default)


# -- routes -----------------------------------------------------------------------------------------


@router.get("/v1/models", **oa.describe(oa.ModelList, errors=(401, 413, 500)))
async def models(served: ServedDep):
    listed = served.engines or {served.settings.model_name: None}  # (names only while loading)
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "penwright"}
            | ({"max_model_len": e.context} if e is not None else {})
            for name, e in listed.items()
        ],
    }


# -- the tokenizer, in vLLM's shapes (lm-evaluation-harness's tokenizer_backend=remote reads them) -----


@router.post("/tokenize", **oa.describe(oa.Tokenized, TokenizeBody))
async def tokenize(http: HttpRequest, served: ServedDep):
    body = await read_body(http, TokenizeBody, served)
    _, eng = served.engine(body.model)
    ids = eng.tokenizer.encode(body.prompt, add_special_tokens=False)
    return {"count": len(ids), "max_model_len": eng.context, "tokens": ids, "token_strs": None}


@router.post("/detokenize", **oa.describe(oa.Detokenized, DetokenizeBody))
async def detokenize(http: HttpRequest, served: ServedDep):
    body = await read_body(http, DetokenizeBody, served)
    _, eng = served.engine(body.model)
    bad = next((j for j, t in enumerate(body.tokens) if not 0 <= t < eng.vocab), None)
    if bad is not None:
        raise ApiError(
            400, f"tokens[{bad}]={body.tokens[bad]}: not a token id of this model (0 to {eng.vocab - 1})", "tokens"
        )
    return {"prompt": eng.decode(body.tokens)}


@router.get("/tokenizer_info", **oa.describe(oa.TokenizerInfo, query=ModelQuery))
async def tokenizer_info(http: HttpRequest, served: ServedDep):
    _, eng = served.engine(http.query_params.get("model"))
    tok = eng.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "model_max_length": eng.context,
        "vocab_size": len(tok),
        "chat_template": None,  # a base model: no chat template
    }


@router.post(
    "/v1/completions",
    **oa.describe(
        oa.Completion,
        CompletionBody,
        errors=(400, 401, 413, 429, 500, 503, 504),
        media={"text/event-stream": oa.SSE},
    ),
)
async def completions(http: HttpRequest, served: ServedDep):
    body = await read_body(http, CompletionBody, served)
    model, eng = served.engine(body.model)
    settings = served.settings
    if body.suffix is not None:
        raise ApiError(400, "suffix is not supported by penwright's server", "suffix")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)", name)
    if body.n > settings.max_n:
        raise ApiError(400, f"n={body.n}: at most {settings.max_n} (serve.max_n)", "n")
    best_of = body.n if body.best_of is None else body.best_of
    if best_of < body.n:
        raise ApiError(400, f"best_of={best_of}: must be >= n ({body.n})", "best_of")
    if best_of > settings.max_n:
        raise ApiError(400, f"best_of={best_of}: at most {settings.max_n} (serve.max_n)", "best_of")
    if best_of > body.n and body.stream:
        raise ApiError(400, "best_of > n cannot be streamed (the best are known at the end): stream=false", "best_of")
    if body.logprobs is not None and body.logprobs > settings.max_logprobs:
        raise ApiError(
            400, f"logprobs={body.logprobs}: at most {settings.max_logprobs} (serve.max_logprobs)", "logprobs"
        )
    texts, encoded = _prompts(eng, body.prompt)
    if len(encoded) * best_of > settings.max_prompts:
        raise ApiError(
            400,
            f"{len(encoded)} prompts x {'best_of' if best_of > body.n else 'n'}={best_of}: at most "
            f"{settings.max_prompts} choices (serve.max_prompts)",
            "prompt",
        )
    bias = _logit_bias(eng, body.logit_bias)
    sampling = sampling_for(
        settings.temperature if body.temperature is None else body.temperature,
        settings.top_k if body.top_k is None else max(0, body.top_k),
        settings.top_p if body.top_p is None else body.top_p,
        body.repetition_penalty or 1.0,
    )
    max_tokens = settings.max_tokens if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens=0 asks for nothing: it needs echo=true (score the prompt alone)", "max_tokens")
    score_prompt = body.echo and (body.logprobs is not None or max_tokens == 0)
    for ids in encoded:
        check_fits(eng, ids, max_tokens, scoring=score_prompt)
    logprobs = body.logprobs if body.logprobs is not None or best_of == body.n else 0  # best_of ranks by them
    requests = [
        Request(
            encoded[i],
            max_tokens,
            sampling,
            min_tokens=min(body.min_tokens, max_tokens),
            stop=tuple(body.stop or ()),
            seed=None if body.seed is None else body.seed + i * best_of + j,
            logprobs=logprobs,
            score_prompt=score_prompt,
            logit_bias=bias,
        )
        for i in range(len(encoded))
        for j in range(best_of)
    ]
    job = Job(eng, requests, settings, served.metrics, model)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    # echo: the prompt as its tokens read (an empty prompt is <|endoftext|>: the offsets index this text)
    shown = [t or eng.decode(ids) for t, ids in zip(texts, encoded)]
    prefix = [shown[k // best_of] if body.echo else "" for k in range(len(requests))]
    usage_prompt = sum(len(ids) for ids in encoded)

    def scores(r: Request, start: int = 0) -> list:  # the choice's scored tokens from start on
        return ((r.prompt_scores if score_prompt else []) + r.scores)[start:]

    if not body.stream:
        await job.wait()
        picked = requests
        if best_of > body.n:  # per prompt, the n of highest mean logprob, best first (a tie keeps the earlier)
            picked = []
            for i in range(len(encoded)):
                group = requests[i * best_of : (i + 1) * best_of]
                ranked = sorted(group, key=lambda r: -sum(s.logprob for s in r.scores) / max(1, len(r.scores)))
                picked += ranked[: body.n]
        choices = []
        for k, r in enumerate(picked):
            text = prefix[requests.index(r)] + r.text
            lp = None
            if body.logprobs is not None:
                lp = _logprobs_json(eng, scores(r), 0)[0]
            choices.append({"text": text, "index": k, "logprobs": lp, "finish_reason": r.finish_reason})
        done = sum(len(r.tokens) for r in requests)
        return {
            **head,
            "choices": choices,
            "usage": {
                "prompt_tokens": usage_prompt,
                "completion_tokens": done,
                "total_tokens": usage_prompt + done,
            },
        }

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    # one event per choice per engine step; when the client reads slower than the engine writes, pieces
    # already waiting are merged into one event (fewer, larger chunks: the same text)
    opening = 'data: {"id":%s,"object":"text_completion","created":%d,"model":%s,"choices":[{"text":' % (  # noqa: UP031 (a template built once a request)
        json.dumps(head["id"]),
        head["created"],
        json.dumps(head["model"]),
    )

    sent, offsets = [0] * len(requests), [0] * len(requests)  # per choice: scored tokens sent, their text

    def chunk(k: int, text: str, reason: str | None) -> str:
        lp = "null"
        if body.logprobs is not None:  # the tokens scored since the last chunk (the engine scores, then emits)
            entries = scores(requests[k], sent[k])
            sent[k] += len(entries)
            lp, offsets[k] = _logprobs_json(eng, entries, offsets[k])
            lp = json.dumps(lp, ensure_ascii=False)
        if echo_pending[k]:  # echo: the prompt leads the choice's first chunk
            text, echo_pending[k] = prefix[k] + text, False
        return (
            f'{opening}{json.dumps(text, ensure_ascii=False)},"index":{k},"logprobs":{lp},'
            f'"finish_reason":{json.dumps(reason)}}}]}}\n\n'
        )

    echo_pending = [bool(p) for p in prefix]

    async def events():
        try:
            if body.echo and not score_prompt:  # scored, the prompt goes with its logprobs after the prefill
                for k in range(len(requests)):
                    yield chunk(k, "", None)
            async for pieces in job.batches():
                failed = [reason for _, _, reason in pieces if reason in ("timeout", "error")]
                if failed:
                    yield _sse(error_body(job.message(failed[0]), kind="server_error"))
                    break
                merged: dict[int, list] = {}
                for k, text, reason in pieces:
                    entry = merged.setdefault(k, ["", None])
                    entry[0] += text
                    entry[1] = reason or entry[1]
                yield "".join(chunk(k, text, reason) for k, (text, reason) in merged.items())
            if include_usage:
                done = sum(len(r.tokens) for r in requests)
                yield _sse(
                    {
                        **head,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": usage_prompt,
                            "completion_tokens": done,
                            "total_tokens": usage_prompt + done,
                        },
                    }
                )
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the slots at the next step
            job.cancel()

    job.start()
    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# -- helpers ----------------------------------------------------------------------------------------


def _prompts(engine: Engine, prompt) -> tuple[list[str], list[list[int]]]:
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


def _logit_bias(engine: Engine, bias: dict[str, float] | None) -> dict[int, float] | None:
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


def _logprobs_json(engine: Engine, entries: list, offset: int) -> tuple[dict, int]:
    """OpenAI's legacy ``logprobs`` object for scored tokens whose text starts at ``offset`` in the choice's
    text; ``top_logprobs`` holds the most likely tokens and the chosen one. Returns it and the next offset."""
    texts = engine.token_texts([e.token for e in entries])
    offsets, top = [], []
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


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
