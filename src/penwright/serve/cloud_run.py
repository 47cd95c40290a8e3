"""gpt-2-cloud-run's API: ``POST /`` and ``POST /generate`` (JSON), ``GET /generate`` and ``GET /?...`` (a query
string; that route is ``page``'s), as that app had them: ``length``, ``temperature``, ``top_k``, ``top_p``,
``prefix``, ``truncate``, ``include_prefix`` (gpt-2-simple's names) -> ``{"text": ...}``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict, Field

from penwright.inference.engine import Request
from penwright.inference.text import finish_text
from penwright.serve import openapi as oa
from penwright.serve.deps import Served, ServedDep, check_fits, parse, read_json, sampling_for
from penwright.serve.jobs import Job

router = APIRouter()


class CloudRunBody(BaseModel):
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
    body = parse(CloudRunBody, params, strict=not query)  # a query string's values are text: converted
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


@router.post("/generate", **oa.describe(oa.CloudRunText, CloudRunBody, errors=ERRORS))
@router.post("/", **oa.describe(oa.CloudRunText, CloudRunBody, errors=ERRORS))
async def cloud_run_post(http: HttpRequest, served: ServedDep):
    return await generate(served, await read_json(http, served.settings.max_body_bytes))


@router.get("/generate", **oa.describe(oa.CloudRunText, errors=ERRORS, query=CloudRunBody))
async def cloud_run_get(http: HttpRequest, served: ServedDep):
    return await generate(served, dict(http.query_params), query=True)
