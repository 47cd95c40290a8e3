"""The HTTP app: OpenAI-compatible completions, gpt-2-cloud-run's API and a playground page, on one engine.

Routes:

* ``POST /v1/completions``: OpenAI's completions API (``stream`` for server-sent events), plus
  vLLM's and llama.cpp's ``top_k``, ``repetition_penalty`` and ``min_tokens``; prompts as text or
  token ids; scoring as vLLM serves it (``logprobs``, ``echo``, ``max_tokens: 0``), ``logit_bias``,
  ``best_of``: what lm-evaluation-harness's ``local-completions`` sends;
* ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``: vLLM's tokenizer routes;
* ``GET /v1/models``; ``GET /health`` (200 once the engine runs, else 503);
* gpt-2-cloud-run's API on ``/`` (as that app had it: ``POST`` JSON, or ``GET`` with a query
  string) and on ``/generate``: ``length``, ``temperature``, ``top_k``, ``top_p``, ``prefix``,
  ``truncate``, ``include_prefix`` -> ``{"text": ...}``;
* ``GET /`` without a query: the playground page (one HTML file, no external resources).

Each choice is one ``engine.Request``; the engine's thread calls back with text, and the callback
hands it to the request's asyncio queue. Bad requests get a 400 in OpenAI's error shape naming the
field (``param``); a full queue a 429 with ``Retry-After``; a missing or wrong API key a 401.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import threading
import time
import traceback
import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from penwright.core.errors import PenwrightError
from penwright.core.schema import Serve
from penwright.inference.engine import Engine, Request
from penwright.inference.sampling import SamplingConfig
from penwright.serve import openapi as oa

PAGE = Path(__file__).with_name("page.html")
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (dividing fp32 logits by less overflows; vLLM does the same)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


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


class Gpt2Body(BaseModel):
    """gpt-2-cloud-run's parameters (gpt-2-simple's names): top_p 0 means off, as there."""

    model_config = ConfigDict(extra="ignore")

    length: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    prefix: str = ""
    truncate: str | None = None
    include_prefix: bool = True
    seed: int | None = Field(None, ge=0)


# -- the app ----------------------------------------------------------------------------------------


def create_app(engine_factory, settings: Serve) -> FastAPI:
    """The app; ``engine_factory()`` loads the engines when the server starts (``/health`` is 503 until then):
    a ``{name: Engine}`` map, the first the default for requests that name no model (or one ``Engine``, served
    as ``settings.model_name``). Each engine runs its own decoding loop on its own thread."""
    from contextlib import asynccontextmanager

    from penwright.serve.metrics import Metrics

    state: dict = {"engine": None, "engines": {}, "threads": {}}
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = await asyncio.to_thread(app.state.load)
        engines: dict[str, Engine] = loaded if isinstance(loaded, dict) else {settings.model_name: loaded}
        threads = {
            name: threading.Thread(target=_run_engine, args=(e,), name=f"penwright-engine-{name}", daemon=True)
            for name, e in engines.items()
        }
        for thread in threads.values():
            thread.start()
        state.update(engine=next(iter(engines.values())), engines=engines, threads=threads, default=next(iter(engines)))
        metrics.engines.update(engines)
        yield
        for e in engines.values():  # uvicorn has already let in-flight responses finish; stop when rows are done
            e.shutdown()
        for thread in threads.values():
            await asyncio.to_thread(thread.join, 30)

    app = FastAPI(title="penwright", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.penwright = state
    app.state.load = engine_factory  # penwright serve loads it before the port opens, then hands it over here

    # -- plumbing: errors, body size, auth ------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return JSONResponse(error_body(err.message, err.param, err.kind), status_code=err.status, headers=err.headers)

    @app.exception_handler(PenwrightError)
    async def _refused(request, err: PenwrightError):  # the engine refused what it was given
        return JSONResponse(error_body(str(err)), 400)

    @app.exception_handler(Exception)
    async def _bug(request, err: Exception):  # a bug, not the client's fault: say so in JSON, log it, keep serving
        traceback.print_exception(err)
        return JSONResponse(
            error_body(f"internal error ({type(err).__name__}); see the server's log", kind="server_error"), 500
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):  # 404, 405: in the same error shape
        headers = dict(getattr(err, "headers", None) or {})
        if err.status_code == 405:  # every method of the path, not only those of the route that matched first
            methods = {
                m for route in app.routes if route.matches(request.scope)[0].name != "NONE" for m in route.methods or ()
            }
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(
            error_body(f"{request.method} {request.url.path}: {err.detail}"), err.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        return _validation_response(err.errors())

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return JSONResponse(
                error_body(
                    f"the request body is {length} bytes; the limit is "
                    f"{settings.max_body_bytes} (serve.max_body_bytes)",
                    "body",
                ),
                413,
            )
        if settings.api_key and request.url.path not in ("/health",) and not _page_request(request):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return JSONResponse(
                    error_body(
                        "missing or wrong API key: send `Authorization: Bearer <key>`",
                        "authorization",
                        "authentication_error",
                    ),
                    401,
                )
        return await call_next(request)

    @app.middleware("http")
    async def _count(request: HttpRequest, call_next):  # registered last: the outermost, the guard's answers counted
        try:
            response = await call_next(request)
        except Exception:
            metrics.responses.labels("500").inc()
            raise
        metrics.responses.labels(str(response.status_code)).inc()
        return response

    def serving() -> bool:
        return bool(state["threads"]) and all(t.is_alive() for t in state["threads"].values())

    def engine(name: str | None = None) -> tuple[str, Engine]:
        """The engine a request's ``model`` names (none: the default) and its name; 503 while loading."""
        if not serving():
            raise ApiError(
                503,
                "the model is not being served (still loading, or stopping)",
                kind="server_error",
                headers={"Retry-After": "1"},
            )
        name = state["default"] if name is None else name
        if name not in state["engines"]:
            choices = ", ".join(repr(n) for n in state["engines"])
            raise ApiError(
                400, f"model={name!r} is not served here; this server serves {choices} (GET /v1/models)", "model"
            )
        return name, state["engines"][name]

    # -- routes ------------------------------------------------------------------------------------

    @app.get(
        "/health",
        responses={
            200: {"description": "serving", "content": {"application/json": oa.ref(oa.Health)}},
            413: {"description": oa.ERRORS[413], "content": {"application/json": oa.ref(oa.ErrorBody)}},
            503: {"description": "still loading", "content": {"application/json": oa.ref(oa.Health)}},
        },
    )
    async def health():
        if not serving():
            return JSONResponse({"status": "loading"}, status_code=503)
        e = state["engine"]
        return {
            "status": "ok",
            "model": state["default"],
            "running": e.running,
            "waiting": e.waiting.qsize(),
            "slots": e.slots,
            "context": e.context,
            "models": {
                name: {"running": m.running, "waiting": m.waiting.qsize(), "slots": m.slots, "context": m.context}
                for name, m in state["engines"].items()
            },
        }

    @app.get("/metrics", response_class=Response, **oa.describe(errors=(401, 413, 500), media={"text/plain": oa.TEXT}))
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", **oa.describe(oa.ModelList, errors=(401, 413, 500)))
    async def models():
        served = state["engines"] or {settings.model_name: None}  # (names only while loading)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "penwright"}
                | ({"max_model_len": e.context} if e is not None else {})
                for name, e in served.items()
            ],
        }

    # -- the tokenizer, in vLLM's shapes (lm-evaluation-harness's tokenizer_backend=remote reads them) -----

    @app.post("/tokenize", **oa.describe(oa.Tokenized, TokenizeBody))
    async def tokenize(http: HttpRequest):
        body = _parse(TokenizeBody, await _json(http, settings.max_body_bytes))
        _, eng = engine(body.model)
        ids = eng.tokenizer.encode(body.prompt, add_special_tokens=False)
        return {"count": len(ids), "max_model_len": eng.context, "tokens": ids, "token_strs": None}

    @app.post("/detokenize", **oa.describe(oa.Detokenized, DetokenizeBody))
    async def detokenize(http: HttpRequest):
        body = _parse(DetokenizeBody, await _json(http, settings.max_body_bytes))
        _, eng = engine(body.model)
        bad = next((j for j, t in enumerate(body.tokens) if not 0 <= t < eng.vocab), None)
        if bad is not None:
            raise ApiError(
                400, f"tokens[{bad}]={body.tokens[bad]}: not a token id of this model (0 to {eng.vocab - 1})", "tokens"
            )
        return {"prompt": eng.decode(body.tokens)}

    @app.get("/tokenizer_info", **oa.describe(oa.TokenizerInfo, query=ModelQuery))
    async def tokenizer_info(http: HttpRequest):
        _, eng = engine(http.query_params.get("model"))
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

    @app.post(
        "/v1/completions",
        **oa.describe(
            oa.Completion,
            CompletionBody,
            errors=(400, 401, 413, 429, 500, 503, 504),
            media={"text/event-stream": oa.SSE},
        ),
    )
    async def completions(http: HttpRequest):
        body = _parse(CompletionBody, await _json(http, settings.max_body_bytes))
        served, eng = engine(body.model)
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
            raise ApiError(
                400, "best_of > n cannot be streamed (the best are known at the end): stream=false", "best_of"
            )
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
        temperature = settings.temperature if body.temperature is None else body.temperature
        top_k = settings.top_k if body.top_k is None else max(0, body.top_k)
        greedy = temperature < GREEDY_BELOW
        sampling = SamplingConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else temperature,
            top_k=top_k,
            top_p=settings.top_p if body.top_p is None else body.top_p,
            repetition_penalty=body.repetition_penalty or 1.0,
        )
        max_tokens = settings.max_tokens if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise ApiError(
                400, "max_tokens=0 asks for nothing: it needs echo=true (score the prompt alone)", "max_tokens"
            )
        score_prompt = body.echo and (body.logprobs is not None or max_tokens == 0)
        for ids in encoded:
            _check(eng, ids, max_tokens, scoring=score_prompt)
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
        job = _Job(eng, requests, settings, metrics, served)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served,
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
            if best_of > body.n:  # per prompt, the n of highest mean logprob (a tie keeps the earlier)
                picked = []
                for i in range(len(encoded)):
                    group = requests[i * best_of : (i + 1) * best_of]
                    ranked = sorted(group, key=lambda r: -sum(s.logprob for s in r.scores) / max(1, len(r.scores)))
                    picked += [r for r in group if r in ranked[: body.n]]
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

    async def gpt2(params: dict, query: bool = False):
        from penwright.inference.text import finish_text

        body = _parse(Gpt2Body, params, strict=not query)  # a query string's values are text: converted
        name, eng = engine()
        temperature = 0.7 if body.temperature is None else body.temperature
        greedy = temperature < GREEDY_BELOW
        sampling = SamplingConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else temperature,
            top_k=body.top_k or 0,
            top_p=body.top_p or 1.0,
        )
        ids = eng.encode(body.prefix)
        length = body.length if body.length is not None else eng.context - len(ids)
        _check(eng, ids, length, tokens="length", prompt="prefix")
        request = Request(ids, length, sampling, seed=body.seed)
        job = _Job(eng, [request], settings, metrics, name)
        await job.wait()
        return {"text": finish_text(body.prefix, request.text, body.truncate, body.include_prefix)}

    gpt2_errors = (400, 401, 413, 429, 500, 503, 504)

    @app.post("/generate", **oa.describe(oa.Gpt2Text, Gpt2Body, errors=gpt2_errors))
    @app.post("/", **oa.describe(oa.Gpt2Text, Gpt2Body, errors=gpt2_errors))
    async def gpt2_post(http: HttpRequest):
        return await gpt2(await _json(http, settings.max_body_bytes))

    @app.get("/generate", **oa.describe(oa.Gpt2Text, errors=gpt2_errors, query=Gpt2Body))
    async def gpt2_get(http: HttpRequest):
        return await gpt2(dict(http.query_params), query=True)

    @app.get(
        "/",
        response_class=HTMLResponse,
        **oa.describe(oa.Gpt2Text, errors=gpt2_errors, query=Gpt2Body, media={"text/html": oa.TEXT}),
    )
    async def page(http: HttpRequest):
        if http.query_params:  # gpt-2-cloud-run's GET form
            return JSONResponse(await gpt2(dict(http.query_params), query=True))
        name, eng = engine()
        return HTMLResponse(
            PAGE.read_text(encoding="utf-8")
            .replace("{{model}}", name)
            .replace("{{max_tokens}}", str(min(128, eng.context - 1)))
            .replace("{{auth}}", "true" if settings.api_key else "false")
        )

    document: dict = {}

    def openapi() -> dict:  # built once, on the first request for it
        if not document:
            document.update(oa.document(app, [CompletionBody, TokenizeBody, DetokenizeBody, Gpt2Body]))
        return document

    app.openapi = openapi
    return app


# -- helpers ----------------------------------------------------------------------------------------


class _Job:
    """The requests of one HTTP call, submitted together. The engine's thread appends each piece of text to a
    deque and wakes the event loop at most once until the loop has taken what is there; ``batches()`` then
    hands over everything waiting, no more often than ``stream_interval`` (the first piece at once)."""

    def __init__(self, engine: Engine, requests: list[Request], settings: Serve, metrics, model: str):
        self.engine, self.requests, self.settings = engine, requests, settings
        self.metrics, self.model = metrics, model
        self.loop = asyncio.get_running_loop()
        self.pieces: collections.deque = collections.deque()
        self.ready = asyncio.Event()
        self.scheduled = False
        for k, r in enumerate(requests):
            r.emit = self._emitter(k)

    def _emitter(self, k: int):
        def emit(text: str, reason: str | None) -> None:  # on the engine's thread
            if reason is not None:
                self.metrics.ended(self.model, self.requests[k])
            self.pieces.append((k, text, reason))
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon_threadsafe(self._wake)

        return emit

    def _wake(self) -> None:
        self.scheduled = False
        self.ready.set()

    def start(self) -> None:
        if self.engine.waiting.qsize() + len(self.requests) > self.settings.queue_size:
            raise ApiError(
                429,
                f"the server is busy: {self.engine.waiting.qsize()} requests are waiting "
                f"(serve.queue_size={self.settings.queue_size}); retry shortly",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        deadline = time.monotonic() + self.settings.request_timeout
        for r in self.requests:
            r.deadline = deadline
            self.engine.submit(r)
            self.metrics.submitted(self.model, r)

    def _drain(self) -> list:
        pieces = []
        while self.pieces:
            pieces.append(self.pieces.popleft())
        return pieces

    async def batches(self):
        """Lists of (choice, text, finish_reason) in the order the engine sent them, at least one each. If the
        engine goes silent past the request's timeout (plus a grace period), the unfinished choices end here
        with ``timeout``: no request waits forever, whatever happens on the engine's thread."""
        left, last = len(self.requests), None
        deadline = time.monotonic() + self.settings.request_timeout + 5.0
        while left:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.cancel()
                yield [(k, "", "timeout") for k, r in enumerate(self.requests) if r.finish_reason is None] or [
                    (0, "", "timeout")
                ]
                return
            self.ready.clear()
            pieces = self._drain()
            ending = any(reason is not None for _, _, reason in pieces)
            if pieces and last is not None and self.settings.stream_interval > 0 and not ending:
                pause = self.settings.stream_interval - (time.monotonic() - last)  # a last piece goes at once
                if pause > 0:
                    await asyncio.sleep(pause)
                    pieces += self._drain()
            if not pieces:
                continue
            last = time.monotonic()
            left -= sum(reason is not None for _, _, reason in pieces)
            yield pieces

    async def wait(self) -> None:
        self.start()
        try:
            async for pieces in self.batches():
                reason = next((r for _, _, r in pieces if r in ("timeout", "error")), None)
                if reason is not None:
                    kind = "timeout" if reason == "timeout" else "server_error"
                    raise ApiError(504 if reason == "timeout" else 500, self.message(reason), kind=kind)
        finally:
            self.cancel()

    def message(self, reason: str) -> str:
        if reason == "timeout":
            return (
                f"the request did not finish within {self.settings.request_timeout:g} s "
                f"(serve.request_timeout); ask for fewer tokens or retry"
            )
        return "the engine failed on this request; see the server's log"

    def cancel(self) -> None:
        for r in self.requests:
            if r.finish_reason is None:
                r.cancel()


def _run_engine(engine: Engine) -> None:
    """The engine's loop; a failing step ends its running requests with an error, and the loop goes on."""
    while True:
        try:
            engine.run_forever()
            return
        except Exception:  # never let one bad step take the server down
            traceback.print_exc()
            engine.fail_running("error")


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


def _check(
    engine: Engine,
    ids: list[int],
    max_tokens: int,
    tokens: str = "max_tokens",
    prompt: str = "prompt",
    scoring: bool = False,
) -> None:
    if scoring and max_tokens == 0:
        if len(ids) > engine.context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens: more than the context of {engine.context} tokens to score",
                prompt,
            )
        return
    if max_tokens < 1:
        raise ApiError(
            400,
            f"{tokens}={max_tokens}: nothing left to generate; the prompt has {len(ids)} tokens and "
            f"the context is {engine.context}",
            tokens if len(ids) < engine.context else prompt,
        )
    if len(ids) + max_tokens > engine.context:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens and {tokens}={max_tokens}: together they exceed "
            f"the context of {engine.context} tokens; shorten the prompt or lower {tokens}",
            tokens if len(ids) < engine.context else prompt,
        )


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _page_request(request: HttpRequest) -> bool:
    return request.method == "GET" and request.url.path == "/" and not request.query_params


async def _json(http: HttpRequest, limit: int) -> dict:
    raw, size = [], 0
    async for chunk in http.stream():  # counted as it comes: a chunked body has no Content-Length to check
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes (serve.max_body_bytes)", "body")
        raw.append(chunk)
    raw = b"".join(raw)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    return data


def _parse(model: type[BaseModel], data: dict, strict: bool = True) -> BaseModel:
    """A JSON body's fields as their declared types, strictly (``"max_tokens": "5"`` is a 400, as the schema
    says); a query string's (``strict=False``) converted from text."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as err:
        raise _ValidationFailed(err.errors()) from None


class _ValidationFailed(ApiError):
    def __init__(self, errors: list):
        first = errors[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or None
        # a union's branches add their type to the location (prompt.str, prompt.list[str]): name the field
        if param and "." in param and param.split(".", 1)[0] in ("prompt", "stop"):
            param = param.split(".", 1)[0]
        super().__init__(400, f"{param}: {first.get('msg')} (got {repr(first.get('input'))[:80]})", param)


def _validation_response(errors: list) -> JSONResponse:
    err = _ValidationFailed(errors)
    return JSONResponse(error_body(err.message, err.param), status_code=400)


def serve_forever(app: FastAPI, host: str, port: int, graceful: float) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful, access_log=False)
