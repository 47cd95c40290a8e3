"""The HTTP app: OpenAI-compatible completions, gpt-2-cloud-run's API and a playground page, on the engines.

``create_app`` puts together what the routers (``completions``: OpenAI's and vLLM's routes; ``cloud_run``:
gpt-2-cloud-run's API; ``page``: the playground page) share through one dependency (``deps.Served``: the engines, the
settings, the metrics): the lifespan that loads the engines and runs each on its own thread, the errors in
OpenAI's shape (a 400 naming the field, a 401 for a missing or wrong API key, a 413 for a body over the
limit, a 429 with ``Retry-After`` when the queue is full), and ``GET /health`` and ``GET /metrics`` (below).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import traceback
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from penwright.core.errors import PenwrightError
from penwright.core.log import get_logger
from penwright.core.schema import Serve
from penwright.serve import chat, cloud_run, completions, page
from penwright.serve import openapi as oa
from penwright.serve.deps import ApiError, Served, ServedDep, error_body, validation_response
from penwright.serve.page import is_page_request

router = APIRouter()  # the server's own routes: /health, /metrics
ROUTERS = (router, completions.router, chat.router, cloud_run.router, page.router)
WARM_UP_TIMEOUT = 30.0  # seconds the warm-up request may take before the server gives up on it and opens its port


def create_app(engine_factory, settings: Serve) -> FastAPI:
    """The app; ``engine_factory()`` loads the engines when the server starts (``/health`` is 503 until then):
    a ``{name: Engine}`` map, the first the default for requests that name no model (or one ``Engine``, served
    as ``settings.model_name``). Each engine runs its own decoding loop on its own thread."""
    served = Served(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = await asyncio.to_thread(app.state.load)
        served.start(loaded if isinstance(loaded, dict) else {settings.model_name: loaded})
        if settings.warm_up:
            await warm_up(app, served)
        yield
        await served.stop()

    app = FastAPI(title="penwright", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.penwright = served
    app.state.load = engine_factory  # penwright serve loads it before the port opens, then hands it over here
    metrics = served.metrics

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
            routes = [r for r in app.routes if hasattr(r, "methods")] + [r for x in ROUTERS for r in x.routes]
            methods = {m for r in routes if r.matches(request.scope)[0].name != "NONE" for m in r.methods or ()}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(
            error_body(f"{request.method} {request.url.path}: {err.detail}"), err.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        return validation_response(list(err.errors()))

    app.add_middleware(Guard, settings=settings, metrics=metrics)

    for r in ROUTERS:
        app.include_router(r)
    document: dict = {}

    def openapi() -> dict:  # built once, on the first request for it
        if not document:
            bodies: list[type[BaseModel]] = [
                completions.CompletionBody,
                chat.ChatBody,
                completions.TokenizeBody,
                completions.DetokenizeBody,
                cloud_run.CloudRunBody,
            ]
            document.update(oa.document(app, bodies))
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI documents this way of replacing it
    return app


async def warm_up(app, served: Served) -> None:
    """One short streamed completion for each model, sent to the app itself (ASGI, no socket) before the port
    opens: routing, the body's validation, the engine's first prefill and decoding steps, the stream (and anyio's
    asyncio backend, which loads on first use) each run once here, not in the first client's request (measured,
    quickstart: 30-60 ms to its first token before, 5-9 ms after, against 4-5 ms warm). Not counted in
    ``/metrics``; a failure is logged and the server serves on."""
    auth = [(b"authorization", f"Bearer {served.settings.api_key}".encode())] if served.settings.api_key else []
    for name in served.engines:
        body = json.dumps({"model": name, "prompt": "The", "max_tokens": 2, "min_tokens": 2, "stream": True}).encode()
        try:
            status, answer = await asyncio.wait_for(
                _ask(app, "/v1/completions", body, auth), min(served.settings.request_timeout, WARM_UP_TIMEOUT)
            )
        except Exception as err:  # noqa: BLE001  (a warm-up only saves time: the server serves without it)
            status, answer = 0, f"{type(err).__name__}: {err}".encode()
        if status != 200 or b'data: {"error"' in answer or not answer.endswith(b"data: [DONE]\n\n"):
            get_logger("serve").warning(
                f"{name}: the warm-up request failed ({status or 'no answer'}: "
                f"{answer.decode(errors='replace')[-300:]}); serving anyway"
            )
    served.metrics.clear()


async def _ask(app, path: str, body: bytes, headers: list) -> tuple[int, bytes]:
    """POST ``body`` (JSON) to ``path`` of the ASGI ``app`` in this process: the answer's status and body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }
    answered = asyncio.Event()
    status, chunks, unread = 0, [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if unread:
            return unread.pop()
        await answered.wait()  # the client leaves once the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    await app(scope, receive, send)
    return status, b"".join(chunks)


class Guard:
    """Every HTTP request's gate, as plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` would re-stream
    each response through a task of its own, a cost on every streamed chunk): a body over
    ``serve.max_body_bytes`` is a 413, a missing or wrong API key a 401 (not for ``/health`` and the page), and
    every answer's status is counted for ``/metrics``."""

    def __init__(self, app, settings: Serve, metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counted(message) -> None:  # counted when the answer starts (a stream: before its body)
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.responses.labels(str(status)).inc()
            await send(message)

        try:
            refused = self.refuse(HttpRequest(scope))
            await (refused or self.app)(scope, receive, counted)
        except Exception:
            if status is None:  # the error handler answers 500
                self.metrics.responses.labels("500").inc()
            raise

    def refuse(self, request: HttpRequest) -> JSONResponse | None:
        settings = self.settings
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
        if settings.api_key and request.url.path not in ("/health",) and not is_page_request(request):
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
        return None


@router.get(
    "/health",
    responses={
        200: {"description": "serving", "content": {"application/json": oa.ref(oa.Health)}},
        413: {"description": oa.ERRORS[413], "content": {"application/json": oa.ref(oa.ErrorBody)}},
        503: {"description": "still loading", "content": {"application/json": oa.ref(oa.Health)}},
    },
)
async def health(served: ServedDep):
    if not served.serving():
        return JSONResponse({"status": "loading"}, status_code=503)
    e = served.engines[served.default]
    return {
        "status": "ok",
        "model": served.default,
        "running": e.running,
        "waiting": e.waiting.qsize(),
        "slots": e.slots,
        "context": e.context,
        "models": {
            name: {"running": m.running, "waiting": m.waiting.qsize(), "slots": m.slots, "context": m.context}
            for name, m in served.engines.items()
        },
    }


@router.get("/metrics", response_class=Response, **oa.describe(errors=(401, 413, 500), media={"text/plain": oa.TEXT}))
async def prometheus(served: ServedDep):
    return Response(served.metrics.render(), media_type=served.metrics.content_type)


def serve_forever(app: FastAPI, host: str, port: int, graceful: float) -> None:
    import uvicorn

    uvicorn.run(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=math.ceil(graceful), access_log=False
    )
