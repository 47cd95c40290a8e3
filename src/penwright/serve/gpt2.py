"""gpt-2-cloud-run's API and the playground page.

* ``POST /`` and ``POST /generate`` (JSON), ``GET /generate`` and ``GET /?...`` (a query string), as that app
  had them: ``length``, ``temperature``, ``top_k``, ``top_p``, ``prefix``, ``truncate``, ``include_prefix``
  (gpt-2-simple's names) -> ``{"text": ...}``;
* ``GET /`` without a query: the playground page (one HTML file, no external resources).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from penwright.inference.engine import Request
from penwright.inference.text import finish_text
from penwright.serve import openapi as oa
from penwright.serve.deps import Served, ServedDep, check_fits, parse, read_json, sampling_for
from penwright.serve.jobs import Job

router = APIRouter()
PAGE = Path(__file__).with_name("page.html")


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


async def generate(served: Served, params: dict, query: bool = False) -> dict:
    """One text, as gpt-2-cloud-run answered: cut at ``truncate``, the prefix kept unless ``include_prefix`` is false."""
    body = parse(Gpt2Body, params, strict=not query)  # a query string's values are text: converted
    name, eng = served.engine()
    sampling = sampling_for(0.7 if body.temperature is None else body.temperature, body.top_k or 0, body.top_p or 1.0)
    ids = eng.encode(body.prefix)
    length = body.length if body.length is not None else eng.context - len(ids)
    check_fits(eng, ids, length, tokens="length", prompt="prefix")
    request = Request(ids, length, sampling, seed=body.seed)
    job = Job(eng, [request], served.settings, served.metrics, name)
    await job.wait()
    return {"text": finish_text(body.prefix, request.text, body.truncate, body.include_prefix)}


ERRORS = (400, 401, 413, 429, 500, 503, 504)


@router.post("/generate", **oa.describe(oa.Gpt2Text, Gpt2Body, errors=ERRORS))
@router.post("/", **oa.describe(oa.Gpt2Text, Gpt2Body, errors=ERRORS))
async def gpt2_post(http: HttpRequest, served: ServedDep):
    return await generate(served, await read_json(http, served.settings.max_body_bytes))


@router.get("/generate", **oa.describe(oa.Gpt2Text, errors=ERRORS, query=Gpt2Body))
async def gpt2_get(http: HttpRequest, served: ServedDep):
    return await generate(served, dict(http.query_params), query=True)


@router.get(
    "/",
    response_class=HTMLResponse,
    **oa.describe(oa.Gpt2Text, errors=ERRORS, query=Gpt2Body, media={"text/html": oa.TEXT}),
)
async def page(http: HttpRequest, served: ServedDep):
    if http.query_params:  # gpt-2-cloud-run's GET form
        return JSONResponse(await generate(served, dict(http.query_params), query=True))
    name, eng = served.engine()
    return HTMLResponse(
        PAGE.read_text(encoding="utf-8")
        .replace("{{model}}", name)
        .replace("{{max_tokens}}", str(min(128, eng.context - 1)))
        .replace("{{auth}}", "true" if served.settings.api_key else "false")
    )


def is_page_request(request: HttpRequest) -> bool:
    return request.method == "GET" and request.url.path == "/" and not request.query_params
