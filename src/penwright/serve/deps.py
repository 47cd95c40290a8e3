"""What every route shares: the served models (a FastAPI dependency), OpenAI's error shape, reading a body.

``Served`` is the app's state: the settings, the metrics and, once the server has started, one engine per
model, each running its decoding loop on its own thread. A route takes it as a parameter ``served:
ServedDep``; ``served.engine(name)`` is the engine a request's ``model`` names (none: the default),
a 400 listing the choices for an unknown name, a 503 while the models load.
"""

from __future__ import annotations

import asyncio
import json
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import Depends
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from penwright.core.copy_index import Copies
from penwright.core.schema import Serve
from penwright.inference.engine import Engine
from penwright.inference.sampling import SamplingConfig
from penwright.serve.metrics import Metrics

Body = TypeVar("Body", bound=BaseModel)  # a route's request body model
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


@dataclass
class Served:
    """The models this server serves and what its routes share."""

    settings: Serve
    metrics: Metrics = field(default_factory=Metrics)
    engines: dict[str, Engine] = field(default_factory=dict)  # name -> engine; the first is the default
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    measures: dict[str, Copies | None] = field(default_factory=dict)  # name -> its copy measures (opened once)

    @property
    def default(self) -> str:
        return next(iter(self.engines), self.settings.model_name)

    def start(self, engines: dict[str, Engine]) -> None:
        """Run each engine's loop on a thread of its own."""
        self.threads = {
            name: threading.Thread(target=_run_engine, args=(e,), name=f"penwright-engine-{name}", daemon=True)
            for name, e in engines.items()
        }
        for thread in self.threads.values():
            thread.start()
        self.engines = dict(engines)
        self.metrics.engines.update(engines)

    async def stop(self) -> None:
        """Stop each engine once its running rows are done (uvicorn has let in-flight responses finish)."""
        for e in self.engines.values():
            e.shutdown()
        for thread in self.threads.values():
            await asyncio.to_thread(thread.join, 30)

    def serving(self) -> bool:
        return bool(self.threads) and all(t.is_alive() for t in self.threads.values())

    def copies(self, name: str, engine: Engine, param: str = "copies") -> Copies:
        """The copy measures of model ``name`` (``serve.copy_index``); a 400 naming the request's field ``param``
        (``copies`` or ``max_copied_span``) where there are none for it."""
        if name not in self.measures:
            folder = self.settings.copy_index
            self.measures[name] = (
                Copies.open(folder, engine.tokenizer, self.settings.copy_min_span)
                if folder and Path(folder).is_dir()
                else None
            )
        found = self.measures[name]
        if found is None:
            raise ApiError(
                400,
                f"{param}: no copy index for model {name!r} (serve.copy_index={self.settings.copy_index!r} is not a "
                "prepared folder with an index made with this model's tokenizer)",
                param,
            )
        return found

    def engine(self, name: str | None = None) -> tuple[str, Engine]:
        """The engine a request's ``model`` names (none: the default) and its name; 503 while loading."""
        if not self.serving():
            raise ApiError(
                503,
                "the model is not being served (still loading, or stopping)",
                kind="server_error",
                headers={"Retry-After": "1"},
            )
        name = self.default if name is None else name
        if name not in self.engines:
            choices = ", ".join(repr(n) for n in self.engines)
            raise ApiError(
                400, f"model={name!r} is not served here; this server serves {choices} (GET /v1/models)", "model"
            )
        return name, self.engines[name]


async def current(http: HttpRequest) -> Served:
    """The dependency: the app's ``Served`` (async, so FastAPI calls it on the event loop, not a thread)."""
    return http.app.state.penwright


ServedDep = Annotated[Served, Depends(current)]  # a route's parameter ``served: ServedDep``


def _run_engine(engine: Engine) -> None:
    """The engine's loop; a failing step ends its running requests with an error, and the loop goes on."""
    while True:
        try:
            engine.run_forever()
            return
        except Exception:  # never let one bad step take the server down
            traceback.print_exc()
            engine.fail_running("error")


def sampling_for(
    temperature: float, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0
) -> SamplingConfig:
    """A request's sampling settings; a temperature of (nearly) 0 is greedy."""
    greedy = temperature < GREEDY_BELOW
    return SamplingConfig(
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )


def check_fits(
    engine: Engine,
    ids: list[int],
    max_tokens: int,
    tokens: str = "max_tokens",
    prompt: str = "prompt",
    scoring: bool = False,
) -> None:
    """A 400 naming the field when a prompt and its new tokens do not fit the model's context."""
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


# -- bodies -----------------------------------------------------------------------------------------


async def read_json(http: HttpRequest, limit: int) -> dict:
    """The body as a JSON object, counted as it arrives (a chunked body has no Content-Length to check)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes (serve.max_body_bytes)", "body")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    return data


def parse(model: type[Body], data: dict, strict: bool = True) -> Body:
    """A JSON body's fields as their declared types, strictly (``"max_tokens": "5"`` is a 400, as the schema
    says); a query string's (``strict=False``) converted from text."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as err:
        raise ValidationFailed(err.errors()) from None


async def read_body(http: HttpRequest, model: type[Body], served: Served) -> Body:
    return parse(model, await read_json(http, served.settings.max_body_bytes))


class ValidationFailed(ApiError):
    """Pydantic's first error as a 400 naming the field."""

    def __init__(self, errors: list):
        first = errors[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or None
        # a union's branches add their type to the location (prompt.str, prompt.list[str]): name the field
        if param and "." in param and param.split(".", 1)[0] in ("prompt", "stop"):
            param = param.split(".", 1)[0]
        super().__init__(400, f"{param}: {first.get('msg')} (got {repr(first.get('input'))[:80]})", param)


def validation_response(errors: list) -> JSONResponse:
    err = ValidationFailed(errors)
    return JSONResponse(error_body(err.message, err.param), status_code=400)
