"""Where the repository is, and a short English text to build corpora and tokenizers from."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ENGLISH = (
    "In the beginning was the word, and the word was written down. It's a short text, we'll see.\n"
    "The quick brown fox jumps over the lazy dog; the dog did not mind at all.\n"
    "Numbers like 12,345 and 2026 appear too, with punctuation: commas, colons and semicolons!\n"
)
