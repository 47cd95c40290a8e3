"""What each route of the app accepts and returns, for ``/openapi.json`` (and the ``/docs`` page).

The routes read their bodies themselves (to count a body's bytes as it arrives and to answer a bad one
in OpenAI's error shape), so FastAPI cannot infer them: ``describe(...)`` gives a route its request body
(the same pydantic model that parses it), its answers (JSON models, the SSE stream, the page's HTML,
Prometheus' text) and every error status it can answer with.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Copies(BaseModel):
    """penwright's extension (a request's ``"copies": true`` or ``"max_copied_span"``): how much of the generated text is copied from the
    training split, and where in the choice's text (``[start, end)`` character ranges)."""

    tokens: int
    longest: int
    longest_chars: int
    document: int | None
    source: str | None
    offset: int | None
    copied_share: float
    min_span: int
    spans: list[list[int]]
    redrawn: int | None = None  # with max_copied_span: how many times the choice was drawn again


class Choice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: str | None
    copies: Copies | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: str
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    copies: Copies | None = None


class ChatCompletion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class SlotState(BaseModel):
    running: int
    waiting: int
    slots: int
    context: int


class Health(BaseModel):
    status: str
    model: str | None = None
    running: int | None = None
    waiting: int | None = None
    slots: int | None = None
    context: int | None = None
    models: dict[str, SlotState] | None = None


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class Detokenized(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    vocab_size: int
    chat_template: str | None


class CloudRunText(BaseModel):
    text: str


ANSWERS: list[type[BaseModel]] = [
    ErrorBody,
    Completion,
    ChatCompletion,
    ModelList,
    Health,
    Tokenized,
    Detokenized,
    TokenizerInfo,
    CloudRunText,
]

ERRORS = {
    400: "a bad request: the message names the field (`param`)",
    401: "a missing or wrong API key (serve.api_key)",
    413: "the body is over serve.max_body_bytes",
    429: "the queue is full (serve.queue_size); retry after `Retry-After` seconds",
    500: "a bug: see the server's log",
    503: "the model is still loading, or the server is stopping; retry after `Retry-After` seconds",
    504: "the request did not finish within serve.request_timeout",
}
RETRY = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
TEXT = {"schema": {"type": "string"}}
SSE = {  # each server-sent event: a completion chunk (the JSON of a Completion without usage), then `[DONE]`
    "schema": {
        "type": "object",
        "properties": {
            "data": {"type": "string", "description": "a chunk's JSON, or [DONE] after the last"},
            "event": {"type": "string"},
        },
        "required": ["data"],
    }
}


def ref(model: type[BaseModel]) -> dict:
    return {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}


def describe(
    ok: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (400, 401, 413, 500, 503),
    media: dict[str, dict] | None = None,
    query: type[BaseModel] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a route decorator: its answers (``ok`` as JSON, and/or other ``media`` types), its
    error statuses in OpenAI's error shape, its JSON request ``body`` or its ``query`` parameters (a model's
    fields, all optional, as gpt-2-cloud-run's GET form takes them)."""
    content = {"application/json": ref(ok)} if ok is not None else {}
    content |= media or {}
    responses: dict = {200: {"description": "OK", "content": content}}
    for status in errors:
        responses[status] = {"description": ERRORS[status], "content": {"application/json": ref(ErrorBody)}}
        if status in (429, 503):
            responses[status]["headers"] = RETRY
    extra: dict[str, Any] = {}
    if body is not None:
        required = bool(body.model_json_schema().get("required"))  # every field has a default: the body may go
        extra["requestBody"] = {"required": required, "content": {"application/json": ref(body)}}
    if query is not None:
        props = query.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
        extra["parameters"] = [{"name": k, "in": "query", "required": False, "schema": v} for k, v in props.items()]
    kwargs: dict[str, Any] = {"responses": responses}
    if extra:
        kwargs["openapi_extra"] = extra
    return kwargs


def document(app, models: list[type[BaseModel]]) -> dict:
    """The app's OpenAPI document: FastAPI's paths with each route's own answers only (no inferred empty JSON
    answer, no 422: validation errors are 400s here) and every model the routes name in its components."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in doc["paths"].values():
        for op in path.values():
            op["responses"].pop("422", None)
            ok = op["responses"].get("200", {}).get("content", {})
            if ok.get("application/json", {}).get("schema") == {}:  # FastAPI's default, where the route said other
                del ok["application/json"]
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for model in [*models, *ANSWERS]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return doc
