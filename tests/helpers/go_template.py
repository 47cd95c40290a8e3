"""Just enough of Go's text/template to render an Ollama Modelfile TEMPLATE over messages (Ollama cannot run
here): text, ``{{ .Content }}`` / ``{{ .Role }}``, string literals, ``range .Messages``, ``if eq .Role "x"``,
``else if``, ``else``, ``end``, and the ``{{-`` / ``-}}`` whitespace trims. Anything else is an error, so a
TEMPLATE that needs more fails the test instead of rendering wrongly."""

from __future__ import annotations

import json
import re

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    at = 0
    for m in _ACTION.finditer(template):
        text = template[at : m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        if m.group(3):
            out.append(("trim", ""))
        at = m.end()
    text = template[at:]
    if out and out[-1][0] == "trim":
        out.pop()
        text = text.lstrip()
    out.append(("text", text))
    return out


def _parse(tokens: list[tuple[str, str]], i: int, stops: tuple[str, ...]) -> tuple[list, int, str]:
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        if value == "end" or value == "else" or value.startswith("else if "):
            if value.split(" ")[0] not in stops and value not in stops:
                raise ValueError(f"unexpected {{{{ {value} }}}}")
            return nodes, i, value
        if value == "range .Messages":
            body, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("range", body))
        elif value.startswith("if "):
            branches, cond = [], value[3:]
            while True:
                body, i, stop = _parse(tokens, i, ("end", "else"))
                branches.append((cond, body))
                if stop == "end":
                    break
                cond = stop[len("else if ") :] if stop.startswith("else if ") else None
            nodes.append(("if", branches))
        else:
            nodes.append(("value", value))
    if stops:
        raise ValueError("a block without {{ end }}")
    return nodes, i, ""


def _value(expr: str, message: dict | None) -> str:
    if expr.startswith('"'):
        return json.loads(expr)
    if expr in (".Content", ".Role") and message is not None:
        return message[expr[1:].lower()]
    raise ValueError(f"unsupported {{{{ {expr} }}}}")


def _true(cond: str | None, message: dict | None) -> bool:
    if cond is None:
        return True
    m = re.fullmatch(r'eq \.Role "(\w+)"', cond)
    if not m or message is None:
        raise ValueError(f"unsupported condition {cond!r}")
    return message["role"] == m.group(1)


def _run(nodes: list, messages: list[dict], message: dict | None) -> str:
    out = []
    for kind, value in nodes:
        if kind == "text":
            out.append(value)
        elif kind == "value":
            out.append(_value(value, message))
        elif kind == "range":
            out += [_run(value, messages, m) for m in messages]
        else:
            out.append(next((_run(body, messages, message) for cond, body in value if _true(cond, message)), ""))
    return "".join(out)


def render_go(template: str, messages: list[dict]) -> str:
    nodes, _, _ = _parse(_tokens(template), 0, ())
    return _run(nodes, messages, None)
