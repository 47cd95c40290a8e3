"""Reading README.md and docs/*.md as a reader would: fenced blocks, the commands in them, links, the CLI's verbs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

PENWRIGHT = Path(sys.executable).parent / "penwright"

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
COMMENT = re.compile(r"<!--\s*(.*?)\s*-->")


def blocks(text: str, lang: str | None = None) -> list[str]:
    """The fenced code blocks of a markdown text, in order (only those of ``lang`` when given)."""
    return [m.group(2) for m in FENCE.finditer(text) if lang is None or m.group(1) == lang]


def block_after(text: str, marker: str) -> str:
    """The first fenced block after the HTML comment ``<!-- marker -->``."""
    at = text.index(f"<!-- {marker} -->")
    found = FENCE.search(text, at)
    assert found, f"no fenced block after <!-- {marker} -->"
    return found.group(2)


def commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv: continuation lines joined, comments dropped, split at && ; | &."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        for token in lexer:
            if token and set(token) <= set(";&|"):
                if argv:
                    out.append(argv)
                argv = []
            else:
                argv.append(token)
        if argv:
            out.append(argv)
    return out


def penwright_commands(text: str) -> list[list[str]]:
    """Every ``penwright ...`` command in the text's bash blocks, as argv without the leading ``penwright``."""
    return [argv[1:] for block in blocks(text, "bash") for argv in commands(block) if argv[0] == "penwright"]


def relative_links(text: str) -> list[str]:
    """Link and image targets that are paths in the repository (no scheme, not a bare #anchor)."""
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def cli_verbs() -> set[str]:
    """The commands ``penwright --help`` lists."""
    done = subprocess.run([str(PENWRIGHT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"^ {4}([a-z][a-z-]*)\b", done.stdout, re.M))
