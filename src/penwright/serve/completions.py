"""OpenAI's API on the engine: ``POST /v1/completions`` and ``GET /v1/models``, with vLLM's tokenizer routes.

``/v1/completions`` is OpenAI's completions API (``stream`` for server-sent events), plus vLLM's and
llama.cpp's ``top_k``, ``repetition_penalty`` and ``min_tokens``; prompts as text or token ids; scoring as
vLLM serves it (``logprobs``, ``echo``, ``max_tokens: 0``), ``logit_bias``, ``best_of``: what
lm-evaluation-harness's ``local-completions`` sends. ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info`` are vLLM's (lm-evaluation-harness's ``tokenizer_backend=remote`` reads them).
The routes read and type the body; ``calls.CompletionCall`` checks it against the model, runs it and answers.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from penwright.inference.engine import Engine
from penwright.serve import openapi as oa
from penwright.serve.calls import CompletionCall
from penwright.serve.deps import ApiError, ServedDep, read_body

router = APIRouter()


# -- request bodies ---------------------------------------------------------------------------------


class GenerationBody(BaseModel):
    """What OpenAI's completion and chat requests share (with vLLM's and llama.cpp's ``top_k``,
    ``repetition_penalty`` and ``min_tokens``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: dict | None = None
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 = all tokens
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # (smaller ones overflow fp32 logits)
    min_tokens: int = Field(0, ge=0)
    copies: bool = False  # penwright's extension: each choice carries its copy measures and copied spans
    max_copied_span: int | None = Field(None, ge=0)  # penwright's: a choice copying a longer span is drawn again
    copy_retries: int = Field(3, ge=0, le=10)  # max_copied_span: draws after the first, then content_filter
    user: str | None = None
    frequency_penalty: float | None = None  # (refused unless 0: use repetition_penalty)
    presence_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings (got {len(stops)})")
        return [s for s in stops if s]


class CompletionBody(GenerationBody):
    """OpenAI's completion request, as vLLM serves it: a prompt as text or token ids (one or a list), scoring
    (``logprobs``, ``echo``, ``max_tokens: 0``), ``logit_bias`` and ``best_of``. Fields it defines that change
    the answer and that penwright cannot honour (suffix, frequency and presence penalties) are refused rather
    than ignored."""

    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, the prompt alone (scored, with logprobs)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)  # the N most likely tokens beside each token's own logprob
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)  # generate best_of per prompt, return the n of highest mean logprob
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias, -100..100


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
    listed: dict[str, Engine | None] = {**served.engines} or {
        served.settings.model_name: None
    }  # (names only while loading)
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
        "chat_template": served.settings.chat_template or getattr(tok, "chat_template", None),
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
    return await CompletionCall(served, body).respond()
