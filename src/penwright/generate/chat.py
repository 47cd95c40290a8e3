"""``penwright chat``: talk with an exported chat model in the terminal, no server.

Each line you type is a ``user`` message; the model's reply streams as it is written and ends where the
persona's turn ends (its end-of-text token). The conversation is rendered by the chat template saved with
the model's tokenizer (``core.chat_format``), the same prompt ``/v1/chat/completions`` builds; when it
outgrows the context, the oldest turns are left out. ``generate``'s keys choose the model and the sampling
(``generate.model_dir``, ``generate.temperature``, ``generate.max_new_tokens``, ``generate.seed``).
An empty line, ``/quit`` or end of input ends the chat; ``/reset`` starts a new conversation.
"""

from __future__ import annotations

import sys

from penwright.core import schema
from penwright.core.chat_format import ChatFormat
from penwright.core.errors import PenwrightError, config_keys
from penwright.generate.stage import load, sampling_of
from penwright.inference.engine import Engine


def chat(cfg: schema.Config, lines=None, out=None) -> list[dict]:
    """Run the chat on ``lines`` (stdin by default), writing to ``out`` (stdout); returns the conversation."""
    g = cfg.generate
    lines, out = lines if lines is not None else sys.stdin, out or sys.stdout
    sampling = sampling_of(g)
    with config_keys("generate", {"slots": "batch_size"}):
        engine = load(g)
    template = getattr(engine.tokenizer, "chat_template", None)
    if not template:
        raise PenwrightError(
            f"{g.model_dir}: this model has no chat template, so it does not know whose turn is whose. Train it on a "
            "chat export (data.format=whatsapp|telegram|messages|sms, docs/chat.md), or use `penwright generate`"
        )
    fmt = ChatFormat.parse(template)
    persona = fmt.persona if fmt else "assistant"
    interactive = hasattr(lines, "isatty") and lines.isatty()
    messages: list[dict] = []
    turn = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = lines.readline()
        text = line.strip()
        if not line or text in ("", "/quit"):
            break
        if text == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        try:
            prompt = fit(engine, messages, g.max_new_tokens)
        except PenwrightError as err:  # the chat goes on without that message
            messages.pop()
            out.write(f"({err})\n")
            continue
        out.write(f"{persona}:")
        out.flush()

        def show(piece: str, _finish) -> None:
            out.write(piece)
            out.flush()

        reply = engine.generate(
            [prompt],
            g.max_new_tokens,
            sampling=sampling,
            seed=None if g.seed is None else g.seed + turn,
            stop_strings=list(g.stop),
            on_text=show,
        )[0]
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply.strip()})
        turn += 1
    return messages


def fit(engine: Engine, messages: list[dict], max_new_tokens: int) -> str:
    """The prompt for ``messages`` (generation prompt added), leaving out the oldest turns until the reply fits
    in the context; a last message that cannot fit on its own is refused."""
    tokenizer = engine.tokenizer
    for first in range(len(messages)):
        prompt = tokenizer.apply_chat_template(messages[first:], tokenize=False, add_generation_prompt=True)
        if len(engine.encode(prompt)) + max_new_tokens <= engine.context:
            return prompt
    raise PenwrightError(
        f"that message is too long for the model's context of {engine.context} tokens with "
        f"generate.max_new_tokens={max_new_tokens}: shorten it or lower generate.max_new_tokens"
    )
