"""How much of each sample is copied from the training text, and the same for human text, as a baseline.

Every sample gets its copy measures (``prepare.copy_index.copy_measures``): the longest span of it found
verbatim in the training split (tokens, characters, the document it is in) and the share of its tokens
inside found spans of at least ``min_span`` tokens. The baseline is the same measures on windows of the
validation split, text from the same source the model never trained on: new text shares some phrases
with any corpus, so a sample is suspicious when it copies far more than that. Copied spans are marked
``⟦…⟧`` in the markdown. The prepared folder must be the one the model's tokenizer came from; otherwise
there is nothing to compare and the stage says so.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from penwright.core.files import load_tokenizer
from penwright.core.log import get_logger
from penwright.prepare.copy_index import CopyIndex, CopyMeasures, copy_measures

log = get_logger("generate").info
BASELINE_WINDOWS = 64  # val windows measured for the baseline
OPEN, CLOSE = "⟦", "⟧"


class Copies:
    """The copy index of a prepared folder and the tokenizer that reads samples into its ids."""

    def __init__(self, prepared: str | Path, tokenizer, min_span: int):
        self.prepared, self.tokenizer, self.min_span = Path(prepared), tokenizer, min_span
        self.index = CopyIndex(self.prepared)

    @classmethod
    def open(cls, prepared: str | Path, tokenizer, min_span: int) -> Copies | None:
        """None (and a line saying why) where the folder has no index or another tokenizer than the model's."""
        prepared = Path(prepared)
        if not (prepared / "index" / "index.json").is_file():
            log(f"no copy measures: {prepared} has no copy index (prepare it with data.copy_index=true)")
            return None
        theirs = load_tokenizer(prepared / "tokenizer", fix="rerun `penwright prepare`")
        if theirs.get_vocab() != tokenizer.get_vocab():
            log(f"no copy measures: {prepared} was prepared with another tokenizer than this model's (data.out_dir)")
            return None
        return cls(prepared, tokenizer, min_span)

    def measure(self, text: str) -> CopyMeasures:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return copy_measures(self.index, ids, self.tokenizer.decode, self.min_span)

    def mark(self, text: str) -> str:
        """``text`` with each copied span of at least ``min_span`` tokens between ⟦ and ⟧."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        lengths = self.index.matches(enc["input_ids"])
        covered = np.zeros(len(lengths), dtype=bool)
        for i in np.flatnonzero(lengths >= self.min_span):
            covered[i : i + lengths[i]] = True
        out, at = [], 0
        for start, end in _runs(covered):
            a, b = enc["offset_mapping"][start][0], enc["offset_mapping"][end - 1][1]
            out += [text[at:a], OPEN, text[a:b], CLOSE]
            at = b
        return "".join(out) + text[at:]

    def baseline(self, length: int) -> dict:
        """The measures' summary over windows of ``length`` tokens of the val split (human text, never trained on)."""
        path = self.prepared / "val.bin"
        import json

        meta = json.loads((self.prepared / "meta.json").read_text())
        val = np.fromfile(path, dtype=np.dtype(meta["dtype"])) if path.is_file() else np.zeros(0)
        if val.size <= length:
            return {}
        starts = np.linspace(0, val.size - length - 1, num=BASELINE_WINDOWS).astype(int)
        measures = [
            copy_measures(self.index, val[s : s + length], self.tokenizer.decode, self.min_span) for s in starts
        ]
        return summary(measures)


def summary(measures: list[CopyMeasures]) -> dict:
    """Medians and maxima of the measures (what generate.json and the logs show)."""
    if not measures:
        return {}
    longest = [m.longest for m in measures]
    share = [m.copied_share for m in measures]
    return {
        "texts": len(measures),
        "longest_tokens_median": statistics.median(longest),
        "longest_tokens_max": max(longest),
        "copied_share_median": round(statistics.median(share), 4),
        "copied_share_max": round(max(share), 4),
    }


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
