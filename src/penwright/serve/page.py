"""The playground page: ``GET /`` without a query string (one HTML file, no external resources); with one, it is
gpt-2-cloud-run's GET form (``cloud_run``). A model with a chat template gets a chat mode too (the default):
a conversation sent to ``/v1/chat/completions``, the persona's reply streaming in.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse

from penwright.core.chat_format import ChatFormat
from penwright.serve import openapi as oa
from penwright.serve.cloud_run import ERRORS, CloudRunBody, generate
from penwright.serve.deps import ApiError, ServedDep

router = APIRouter()
PAGE = Path(__file__).with_name("page.html")


@router.get(
    "/",
    response_class=HTMLResponse,
    **oa.describe(oa.CloudRunText, errors=ERRORS, query=CloudRunBody, media={"text/html": oa.TEXT}),
)
async def page(http: HttpRequest, served: ServedDep):
    if http.query_params:  # gpt-2-cloud-run's GET form
        return JSONResponse(await generate(served, dict(http.query_params), query=True))
    name, eng = served.engine()
    template = served.settings.chat_template or getattr(eng.tokenizer, "chat_template", None)
    persona = ChatFormat.parse(template)
    chat = {"persona": persona.persona if persona else "assistant"} if template else None
    try:
        served.copies(name, eng)
        copies = True
    except ApiError:  # no copy index for this model: no checkbox
        copies = False
    return HTMLResponse(
        PAGE.read_text(encoding="utf-8")
        .replace("{{model}}", name)
        .replace("{{max_tokens}}", str(min(128, eng.context - 1)))
        .replace("{{auth}}", "true" if served.settings.api_key else "false")
        .replace("{{chat}}", json.dumps(chat).replace("<", "\\u003c"))
        .replace("{{copies}}", "true" if copies else "false")
        .replace("{{site}}", "false")
        .replace("{{where}}", "Served by this machine, nothing leaves it.")
    )


def is_page_request(request: HttpRequest) -> bool:
    return request.method == "GET" and request.url.path == "/" and not request.query_params
