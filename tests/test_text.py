"""penwright.inference.text against the tokenizer's own decode: a row's text grown token by token is the text
of all its tokens decoded at once, a stop string is cut and never shown, a partial character waits."""

from __future__ import annotations

import pytest

from penwright.inference.text import Decoder, RowText
from penwright.prepare.tokenizer import byte_tokenizer, train_bpe

TEXT = "In the beginning God created the heaven and the earth. «Ça va», naïve café — 東京 and more words 🙂."


@pytest.fixture(scope="module", params=["bpe", "bytes"])
def tokenizer(request):
    return train_bpe([TEXT * 4], vocab_size=300) if request.param == "bpe" else byte_tokenizer()


def grow_all(row: RowText, ids: list[int]) -> tuple[list[str], bool]:
    shown, stopped = [], False
    for n in range(1, len(ids) + 1):
        if row.grow(ids[:n]):
            stopped = True
            break
        shown.append(row.showable())
    return shown, stopped


def test_grown_text_is_the_whole_decode_and_never_shows_half_a_character(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    decoder = Decoder(tokenizer)
    row = RowText(decoder)
    shown, stopped = grow_all(row, ids)
    assert not stopped and row.text == tokenizer.decode(ids) == TEXT
    assert "".join(shown) == TEXT and not any("\ufffd" in piece for piece in shown)
    row.final(ids)
    assert row.rest() == "" and row.text == TEXT
    half = ids[: next(n for n in range(1, len(ids)) if decoder.decode(ids[:n]).endswith("\ufffd"))]
    partial = RowText(decoder)
    grow_all(partial, half)
    assert "\ufffd" not in partial.text  # incremental: the partial character waits for its other bytes
    partial.final(half)
    assert partial.text == decoder.decode(half) and partial.rest().endswith("\ufffd")  # final: all of it


@pytest.mark.parametrize("stop", ["God created", "naïve", "e"])
def test_a_stop_string_cuts_the_text_and_is_never_shown(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    row = RowText(Decoder(tokenizer), (stop, "never there"))
    shown, stopped = grow_all(row, ids)
    assert stopped and row.text == TEXT[: TEXT.index(stop)]
    assert "".join(shown) + row.rest() == row.text and stop not in "".join(shown)


def test_final_cuts_a_stop_string_that_growing_had_not_seen(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    row = RowText(Decoder(tokenizer), ("🙂",))
    seen = max(n for n in range(len(ids)) if "🙂" not in tokenizer.decode(ids[:n]))
    shown, stopped = grow_all(row, ids[:seen])
    assert not stopped
    assert row.final(ids) and row.text == TEXT[: TEXT.index("🙂")]
    assert "".join(shown) + row.rest() == row.text


def test_random_token_runs_grow_into_their_whole_decode(tokenizer):
    """Any ids, lone continuation bytes and cut characters included: the text shown as it grows is a prefix of
    the whole decode, and the rest after ``final`` completes it."""
    import random

    rng = random.Random(0)
    decoder = Decoder(tokenizer)
    vocab = len(tokenizer)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 24))]
        whole = decoder.decode(ids)
        row = RowText(decoder)
        shown, _ = grow_all(row, ids)
        assert whole.startswith("".join(shown)), ids
        row.final(ids)
        assert "".join(shown) + row.rest() == whole == row.text, ids
