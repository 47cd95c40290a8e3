"""Text from tokens as they arrive: incremental detokenization, stop strings, and what is safe to show.

The engine samples tokens; this module turns them into text:

* ``Decoder``: a tokenizer's ``decode`` (its Rust backend directly, where that gives the same text), and
  each token's own text (cached; for logprobs);
* ``RowText``: one row's text as its tokens grow. Incremental detokenization as vLLM does it: only the
  last few tokens are decoded, and only once they no longer end inside a multi-byte character. The text
  is cut before the first stop string, and its last ``len(stop) - 1`` characters are held back from
  what is shown while they may begin one, so a stop string is never streamed;
* ``finish_text``: gpt-2-simple's post-processing of a sample (``truncate``, ``include_prefix``, ``strip``).
"""

from __future__ import annotations


class Decoder:
    """How the engine turns ids into text for one tokenizer."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=False)  # the same text, less overhead
        else:
            self.decode = tokenizer.decode
        # byte-level BPE decodes token runs that end on whole characters independently: text(a + b) = text(a) + text(b)
        decoder = getattr(backend, "decoder", None) if self.decode is not tokenizer.decode else None
        self.concatenates = type(decoder).__name__ == "ByteLevel"
        self._token_texts: dict[int, str] = {}

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (a piece of a multi-byte character shows as U+FFFD, as in vLLM's logprobs)."""
        return [self.token_text(t) for t in ids]

    def token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.decode([token])
        return text


class RowText:
    """One row's text while its tokens grow: ``grow`` after each token, ``showable`` for the part to stream,
    ``final`` once at the end (the whole text, decoded at once)."""

    def __init__(self, decoder: Decoder, stop: tuple[str, ...] = ()):
        self.decoder, self.stop = decoder, stop
        self.text = ""
        self.shown = 0  # characters of text already handed out by showable()
        self.prefix_offset = self.read_offset = 0  # tokens [prefix, read) are the text's last piece
        self.prefix_chars = 0  # the length of the text of tokens [prefix, read)
        self.holdback = max(map(len, stop), default=1) - 1

    def grow(self, tokens: list[int]) -> bool:
        """Add the text the newest tokens complete. True when a stop string ended it (the text is cut before it)."""
        before = len(self.text)
        if self.decoder.concatenates and self.read_offset == len(tokens) - 1:  # only the newest token is unread
            piece = self.decoder.token_text(tokens[-1])
            if piece and "\ufffd" not in piece:  # whole characters: what decoding the last piece with it would add
                self.text += piece
                self.prefix_offset, self.read_offset, self.prefix_chars = self.read_offset, len(tokens), len(piece)
                return self._cut(max(0, before - self.holdback))
        decode = self.decoder.decode
        full = decode(tokens[self.prefix_offset :])
        if len(full) > self.prefix_chars and not full.endswith("\ufffd"):
            self.text += full[self.prefix_chars :]
            self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
            # the new prefix is the piece just added: byte-level decoding of whole characters concatenates
            self.prefix_chars = (
                len(full) - self.prefix_chars
                if self.decoder.concatenates
                else len(decode(tokens[self.prefix_offset : self.read_offset]))
            )
        return len(self.text) > before and self._cut(max(0, before - self.holdback))

    def showable(self) -> str:
        """The text not shown yet that cannot begin a stop string (then counted as shown)."""
        upto = len(self.text) - self.holdback
        if upto <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : upto], upto
        return piece

    def final(self, tokens: list[int]) -> bool:
        """The whole text, decoded at once (a trailing partial character included). True when a stop string
        completed by the last bytes, which incremental decoding had held back, cut it."""
        self.text = self.decoder.decode(tokens)
        return self._cut(max(0, self.shown - self.holdback))

    def rest(self) -> str:
        """What showable() has not handed out (all of it is shown then)."""
        piece, self.shown = self.text[self.shown :], len(self.text)
        return piece

    def _cut(self, start: int) -> bool:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)


def finish_text(prompt: str, new: str, truncate: str | None, include_prefix: bool, strip: bool = False) -> str:
    """gpt-2-simple's post-processing: cut at ``truncate``, keep or drop the prompt; strip whitespace."""
    if truncate and truncate in new:
        new = new[: new.index(truncate)]
    text = prompt + new if include_prefix else new
    return text.strip() if strip else text
