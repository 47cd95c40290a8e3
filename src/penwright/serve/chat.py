"""OpenAI's chat API on the engine: ``POST /v1/chat/completions``, as vLLM serves it.

The messages become one prompt through the model's chat template (``serve.chat_template``, else the
``chat_template`` saved with its tokenizer), rendered by transformers' ``apply_chat_template`` with the
generation prompt added: the same ids ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``
gives anywhere else. A model without a template gets a 400 that says how to give one, as vLLM answers.
From there it is a completion call (``calls.CompletionCall``: the same checks, continuous batching, metrics
and API key) whose choices and streamed chunks take the chat shape: ``message`` / ``delta`` (the role
first, then the content, then ``finish_reason``), ``chat.completion.chunk`` events, ``data: [DONE]``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Literal

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict, Field

from penwright.inference.engine import Engine, Request
from penwright.serve import openapi as oa
from penwright.serve.calls import CompletionCall
from penwright.serve.completions import GenerationBody
from penwright.serve.deps import ApiError, Served, ServedDep, read_body

router = APIRouter()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str  # text only: penwright's models read text
    name: str | None = None  # the speaker, in a group chat


class ChatBody(GenerationBody):
    """OpenAI's chat completion request, as vLLM serves it. Fields that change the answer and that penwright
    cannot honour (tools, penalties, response formats) are refused rather than ignored."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list | None = None
    response_format: dict | None = None


class ChatCall(CompletionCall):
    """A chat completion: the messages rendered through the chat template, then a completion call answered in
    the chat shape."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, served: Served, body: ChatBody):
        _, engine = served.engine(body.model)
        for name in ("tools", "response_format"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported by penwright's server", name)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        text = render(engine, served.settings.chat_template, [m.model_dump(exclude_none=True) for m in body.messages])
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        as_completion = SimpleNamespace(  # the completion request these messages make
            **body.model_dump(exclude={"messages", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens"}),
            max_tokens=max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            echo=False,
            best_of=None,
            logit_bias=None,
            suffix=None,
        )
        super().__init__(served, as_completion, [text], [ids])
        self.role_sent = [False] * len(self.requests)

    def choice_json(self, index: int, r: Request) -> dict:
        lp = self.chat_logprobs(self.scores(r)) if self.body.logprobs is not None else None
        message = {"role": "assistant", "content": r.text}
        choice = {"index": index, "message": message, "logprobs": lp, "finish_reason": r.finish_reason}
        return choice | self.copies_json(r)

    def chunk_json(self, k: int, text: str, reason: str | None) -> str:
        """The choice's role in its first chunk, then its new text; the finish reason in a chunk of its own."""
        out = []
        lp = self.chat_logprobs(self.scored_since(k)) if self.body.logprobs is not None else None
        delta: dict = {}
        if not self.role_sent[k]:
            delta["role"], self.role_sent[k] = "assistant", True
            if not text:
                delta["content"] = ""
        if text:
            delta["content"] = text
        if delta:
            out.append({"index": k, "delta": delta, "logprobs": lp, "finish_reason": None})
        if reason is not None:
            last = {"index": k, "delta": {}, "logprobs": None, "finish_reason": reason}
            out.append(last | self.copies_json(self.requests[k]))
        return "".join(f"{self.stream_prefix}{json.dumps(c, ensure_ascii=False)}]}}\n\n" for c in out)

    def chat_logprobs(self, entries: list) -> dict:
        """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        eng: Engine = self.engine
        texts = eng.token_texts([e.token for e in entries])
        content = []
        for e, text in zip(entries, texts):
            top = [
                {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                for t, lp in zip(eng.token_texts([i for i, _ in e.top]), (lp for _, lp in e.top))
            ]
            content.append(
                {"token": text, "logprob": e.logprob, "bytes": list(text.encode("utf-8")), "top_logprobs": top}
            )
        return {"content": content}


def render(engine: Engine, template: str | None, messages: list[dict]) -> str:
    """The prompt ``messages`` make under the chat template (``serve.chat_template``, else the tokenizer's), with
    the generation prompt added; a 400 when the model has none or the template fails on these messages."""
    template = template or getattr(engine.tokenizer, "chat_template", None)
    if not template:
        raise ApiError(
            400,
            "this model has no chat template, so /v1/chat/completions cannot build its prompt: give one with "
            "serve.chat_template (a Jinja template) or save one with the tokenizer; /v1/completions takes plain text",
            "messages",
        )
    try:
        return engine.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as err:  # jinja's TemplateError, or raise_exception() in the template
        raise ApiError(400, f"the chat template cannot render these messages: {err}", "messages") from None


@router.post(
    "/v1/chat/completions",
    **oa.describe(
        oa.ChatCompletion,
        ChatBody,
        errors=(400, 401, 413, 429, 500, 503, 504),
        media={"text/event-stream": oa.SSE},
    ),
)
async def chat_completions(http: HttpRequest, served: ServedDep):
    body = await read_body(http, ChatBody, served)
    return await ChatCall(served, body).respond()
