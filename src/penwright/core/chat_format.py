"""The one chat template: a conversation as the text a chat model is trained on and prompted with.

A conversation is written line by line as people read a chat log, each turn ``Name: text``::

    Eliphaz: If we assay to commune with thee, wilt thou be grieved?
    Job: Oh that my grief were throughly weighed!<|endoftext|>Eliphaz: ...

The persona (the speaker the model learns to write, the ``assistant`` role) ends each turn with the
end-of-text token, so a reply stops where the persona's turn ends and never goes on to write another
speaker's line; everyone else's turn (``user``, with their ``name`` in a group chat, else the other side's
name) ends with a newline, a system message is a line of its own. The generation prompt is ``Persona:``.

``ChatFormat`` is that format for one persona: ``jinja()`` is the template saved inline as ``chat_template``
in the tokenizer's ``tokenizer_config.json`` (so transformers, transformers.js, llama.cpp and the server all
render it), ``render()`` writes the same text in Python with the character spans of the persona's turns
(what the training loss counts), and ``ollama_template()`` is the same format as an Ollama Modelfile TEMPLATE.
``ChatFormat.parse(template)`` reads the persona and the other side back from a saved template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ChatFormat:
    persona: str  # the assistant's name: whose turns the model writes
    other: str  # the name of a user turn that gives none (in a two-person chat: the other person)

    def jinja(self) -> str:
        """The Jinja chat template (messages -> text), in the dialect transformers and llama.cpp both read."""
        return (
            f"{{%- set persona = {_literal(self.persona)} -%}}\n"
            f"{{%- set other = {_literal(self.other)} -%}}\n"
            "{%- for message in messages -%}\n"
            "{%- if message['role'] == 'system' -%}\n"
            "{{- message['content'] + '\\n' -}}\n"
            "{%- elif message['role'] == 'assistant' -%}\n"
            "{{- persona + ': ' + message['content'] + eos_token -}}\n"
            "{%- else -%}\n"
            "{{- (message['name'] if message['name'] is defined and message['name'] else other)"
            " + ': ' + message['content'] + '\\n' -}}\n"
            "{%- endif -%}\n"
            "{%- endfor -%}\n"
            "{%- if add_generation_prompt -%}\n"
            "{{- persona + ':' -}}\n"
            "{%- endif -%}"
        )

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The template's text for ``messages`` (no generation prompt) and the ``[start, end)`` character spans
        the loss counts: each persona turn's text after ``Persona:`` up to and including its end-of-text token."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        at = 0
        for m in messages:
            if m["role"] == "system":
                piece = m["content"] + "\n"
            elif m["role"] == "assistant":
                head = self.persona + ":"
                piece = f"{head} {m['content']}{EOS}"
                spans.append((at + len(head), at + len(piece)))
            else:
                piece = f"{m.get('name') or self.other}: {m['content']}\n"
            parts.append(piece)
            at += len(piece)
        return "".join(parts), spans

    def generation_prompt(self) -> str:
        return self.persona + ":"

    def ollama_template(self) -> str:
        """The same format as an Ollama Modelfile TEMPLATE (Go's text/template over ``.Messages``); Ollama's
        messages carry no name, so every user turn is the other side's."""
        return (
            '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n'
            f'{{{{ else if eq .Role "assistant" }}}}{_go(self.persona)}: {{{{ .Content }}}}{EOS}'
            f"{{{{ else }}}}{_go(self.other)}: {{{{ .Content }}}}\n"
            "{{ end }}{{ end }}" + _go(self.persona) + ":"
        )

    @classmethod
    def parse(cls, template: str | None) -> ChatFormat | None:
        """The format a template ``jinja()`` wrote describes; None for any other template (or none)."""
        if not template:
            return None
        m = re.match(r"\{%- set persona = (\".*?(?<!\\)\") -%\}\n\{%- set other = (\".*?(?<!\\)\") -%\}\n", template)
        if m is None:
            return None
        found = cls(json.loads(m[1]), json.loads(m[2]))
        return found if found.jinja() == template else None


def _literal(name: str) -> str:
    """A name as a Jinja string literal (JSON's escapes are Jinja's)."""
    return json.dumps(name, ensure_ascii=False)


def _go(text: str) -> str:
    """Literal text in a Go template: only ``{{`` would start an action."""
    return text.replace("{{", '{{ "{{" }}')
