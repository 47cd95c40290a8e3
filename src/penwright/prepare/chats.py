"""Read chat exports as conversations: who said what, and when.

The formats people's phones and apps write (``read_chat`` picks by ``format``, or detects it from the file):

* ``whatsapp``: WhatsApp's "Export chat" text. Android writes ``12/24/19, 9:41 PM - Name: text``, iOS
  ``[24.12.19, 21:41:03] Name: text`` (with invisible U+200E marks); 12- or 24-hour clocks, day-first or
  month-first dates (decided per file: the reading under which every date parses and time runs forward),
  messages over several lines, system lines, media placeholders and deleted messages.
* ``telegram``: Telegram Desktop's JSON export, one chat's ``result.json`` or the whole account's
  (``chats.list``); ``text`` as a string or a list of entities; service and media-only messages.
* ``messages``: JSONL, one ``{"messages": [{"role", "content", "name"?}]}`` a line (OpenAI's finetuning
  files, TRL); a speaker is the message's ``name``, else its role.
* ``sms``: Android's "SMS Backup & Restore" XML (``<sms address= contact_name= date= type= body=/>``): one
  chat per contact; type 2 was sent by the phone's owner (the speaker ``me``), type 1 received.

What is dropped (system lines, media, deleted messages, empty ones) is counted per reason in ``Chat.dropped``,
never silently. ``scrub`` replaces phone numbers, e-mail addresses and URLs with placeholders; ``turns``
cuts a chat into conversations at long silences and merges one speaker's consecutive messages into a turn.
Every problem is a ``CorpusError`` naming the file and the line or position.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from xml.etree import ElementTree

from penwright.core.errors import CorpusError

FORMATS = ("whatsapp", "telegram", "messages", "sms")
OWNER = "me"  # the speaker of an SMS backup's sent messages: the phone's owner


@dataclass
class Message:
    sender: str
    text: str
    time: datetime | None = None  # None where the format has no time (messages JSONL)
    role: str | None = None  # messages JSONL: system, user, assistant


@dataclass
class Chat:
    """One chat (a WhatsApp export, a Telegram chat, an SMS contact, a JSONL line) in the order it was written."""

    source: str  # the file, and where in it when one file holds several chats
    messages: list[Message] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> messages left out

    def speakers(self) -> Counter:
        """Messages per speaker (a messages file's system prompts are nobody's)."""
        return Counter(m.sender for m in self.messages if m.role != "system")


def read_chat(path: str | Path, format: str = "auto") -> list[Chat]:
    """The chats in one export file."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise CorpusError(f"{path}: the export is empty or missing; export the chat again")
    if format == "auto":
        format = detect_format(path)
    if format not in FORMATS:
        raise CorpusError(f"{path}: data.format={format!r} is not a chat format ({', '.join(FORMATS)})")
    chats = {"whatsapp": _whatsapp, "telegram": _telegram, "messages": _messages, "sms": _sms}[format](path)
    if not any(c.messages for c in chats):
        dropped = sum((c.dropped for c in chats), Counter())
        raise CorpusError(
            f"{path}: no messages with text in this {format} export"
            + (f" ({_counts(dropped)} left out)" if dropped else "")
        )
    return chats


def detect_format(path: Path) -> str:
    """The chat format of a file, from its name and first bytes; a file that fits none is refused, naming them."""
    try:
        head = _head(path)
    except OSError as err:
        raise CorpusError(f"{path}: cannot be read ({err})") from None
    if head.startswith("<?xml") or head.startswith("<smses"):
        return "sms"
    if path.suffix == ".jsonl" or head.startswith('{"messages"'):
        return "messages"
    if head.startswith("{"):
        return "telegram"
    if _HEADER.match(head.splitlines()[0] if head else ""):
        return "whatsapp"
    raise CorpusError(
        f"{path}: not a chat export penwright knows; the formats are {', '.join(FORMATS)} "
        "(WhatsApp's exported .txt, Telegram Desktop's result.json, messages JSONL, SMS Backup & Restore XML): "
        "set data.format if the file is one of them"
    )


def _head(path: Path) -> str:
    with path.open("rb") as f:
        return f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff\u200e \n")


def is_whatsapp(path: Path) -> bool:
    """A text file whose first line is a WhatsApp export's date line."""
    return bool(_HEADER.match(_head(path).split("\n", 1)[0]))


def is_messages(path: Path) -> bool:
    """A JSONL file whose first record is ``{"messages": [...]}``."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(record := json.loads(first), dict) and isinstance(record.get("messages"), list)
    except json.JSONDecodeError:
        return False


# -- WhatsApp ------------------------------------------------------------------------------------------

DATE_ORDERS = ("dmy", "mdy", "ymd")  # day-first, month-first, year-first
_MARKS = "\u200e\u200f\u202a\u202c\ufeff"  # invisible direction marks iOS puts around names and system text
_HEADER = re.compile(
    r"^[" + _MARKS + r"]*\[?(?P<date>\d{1,4}[./-]\d{1,2}[./-]\d{1,4}),?\s+"
    r"(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2})?)(?:[\s\u202f]*(?P<ampm>[AaPp]\.?\s?[Mm]\.?))?\]?"
    r"(?:\s+-\s+|\s+)(?P<rest>.*)$"
)
_SYSTEM = re.compile(
    r"(end-to-end encrypted|created (this )?group|created group|\badded\b|\bremoved\b|\bleft$|\bjoined\b|"
    r"changed (the subject|this group's|the group|their phone number|the settings)|changed to|"
    r"security code|deleted this group's icon|now an admin|turned (on|off) disappearing|pinned a message)",
    re.IGNORECASE,
)
_MEDIA = re.compile(
    r"^(<Media omitted>|<attached: .*>|(image|video|audio|sticker|GIF|document|Contact card) omitted|"
    r".* \(file attached\)|null|<View once voice message omitted>|view once (photo|video) omitted)$",
    re.IGNORECASE,
)
_DELETED = re.compile(
    r"^(This message was deleted\.?|You deleted this message\.?|This message was deleted by admin.*)$", re.IGNORECASE
)


def _whatsapp(path: Path) -> list[Chat]:
    chat = Chat(str(path))
    raw: list[tuple[int, str, str, str | None, str]] = []  # line, date, time, am/pm, rest
    with path.open(encoding="utf-8-sig", errors="replace", newline=None) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            m = _HEADER.match(line)
            if m:
                raw.append((number, m["date"], m["time"], m["ampm"], m["rest"]))
            elif raw:  # a message that runs over several lines
                n, d, t, a, rest = raw[-1]
                raw[-1] = (n, d, t, a, rest + "\n" + line)
            elif line.strip(_MARKS + " \t"):
                raise CorpusError(
                    f"{path}:{number}: a line before the first message that is not a WhatsApp date line "
                    f"({line[:60]!r}); export the chat again (without editing it) or set data.format"
                )
    times = _whatsapp_times(path, raw)
    for (_, _, _, _, rest), time in zip(raw, times):
        sender, sep, text = rest.partition(": ")
        clean = text.strip(_MARKS + " \t\n")
        if not sep:  # Android: a line with no "Name: " is the app's own (encryption notice, "Ann added Bob", ...)
            chat.dropped["system"] += 1
        elif _MEDIA.match(clean):
            chat.dropped["media"] += 1
        elif _DELETED.match(clean):
            chat.dropped["deleted"] += 1
        elif text[:1] in _MARKS and _SYSTEM.search(clean):  # iOS: the app's own lines start with a mark
            chat.dropped["system"] += 1
        elif not clean:
            chat.dropped["empty"] += 1
        else:
            chat.messages.append(Message(sender.strip(_MARKS + " "), clean.replace(_MARKS[0], ""), time))
    return [chat]


def _whatsapp_times(path: Path, raw: list) -> list[datetime]:
    """Each header's time, reading the dates day-first or month-first: the order under which every date
    parses and time goes back least (phones write one order per export)."""
    best: tuple[int, list[datetime]] | None = None
    for order in DATE_ORDERS:
        try:
            times = [_when(d, t, a, order) for _, d, t, a, _ in raw]
        except ValueError:
            continue
        backwards = sum(b < a for a, b in zip(times, times[1:]))
        if best is None or backwards < best[0]:
            best = (backwards, times)
    if best is None:
        number, date, time = next((n, d, t) for n, d, t, a, _ in raw if not _parses(d, t, a))
        raise CorpusError(
            f"{path}:{number}: the date {date!r} {time!r} is in no date format penwright knows "
            "(day/month/year or month/day/year, 2- or 4-digit year); export the chat again"
        )
    return best[1]


def _parses(date: str, time: str, ampm: str | None) -> bool:
    for order in DATE_ORDERS:
        try:
            _when(date, time, ampm, order)
            return True
        except ValueError:
            pass
    return False


def _when(date: str, time: str, ampm: str | None, order: str) -> datetime:
    parts = [int(p) for p in re.split(r"[./-]", date)]
    values = dict(zip(order, parts))
    year = values["y"] + (2000 if values["y"] < 100 else 0)
    clock = [int(p) for p in re.split(r"[:.]", time)]
    hour, minute, second = clock[0], clock[1], clock[2] if len(clock) > 2 else 0
    if ampm:
        if not 1 <= hour <= 12:
            raise ValueError(f"hour {hour} with {ampm}")
        hour = hour % 12 + (12 if ampm.lower().startswith("p") else 0)
    return datetime(year, values["m"], values["d"], hour, minute, second)


# -- Telegram -----------------------------------------------------------------------------------------


def _telegram(path: Path) -> list[Chat]:
    data = _load_json(path)
    if isinstance(data.get("chats"), dict):  # the whole account's export
        listed = data["chats"].get("list") or []
        return [_telegram_chat(c, f"{path}: chat {c.get('name') or c.get('id')!r}") for c in listed]
    if "messages" not in data:
        raise CorpusError(f"{path}: a JSON file with no 'messages' (nor 'chats') key: not a Telegram export")
    return [_telegram_chat(data, str(path))]


def _telegram_chat(data: dict, source: str) -> Chat:
    chat = Chat(source)
    for m in data.get("messages") or []:
        if m.get("type") != "message":
            chat.dropped["system"] += 1
            continue
        text = _telegram_text(m.get("text", ""))
        if not text.strip():
            chat.dropped[
                "media" if any(k in m for k in ("photo", "file", "media_type", "sticker_emoji")) else "empty"
            ] += 1
            continue
        time = datetime.fromisoformat(m["date"]) if m.get("date") else None
        chat.messages.append(Message(str(m.get("from") or m.get("actor") or "unknown"), text.strip(), time))
    return chat


def _telegram_text(text) -> str:
    """``text`` as Telegram writes it: a string, or a list of strings and entities (``{"type", "text"}``)."""
    if isinstance(text, str):
        return text
    return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in text)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise CorpusError(
            f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}): "
            "the export is cut short or damaged; export it again"
        ) from None
    if not isinstance(data, dict):
        raise CorpusError(f"{path}: the JSON is not an object: not a Telegram export")
    return data


# -- messages JSONL -----------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


def _messages(path: Path) -> list[Chat]:
    chats = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where}: not valid JSON at column {err.colno} ({err.msg})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise CorpusError(f'{where}: each line must be {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
            chat = Chat(where)
            for i, m in enumerate(messages):
                role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
                if role not in ROLES:
                    raise CorpusError(f"{where}: messages[{i}].role={role!r}: use one of {', '.join(ROLES)}")
                if not isinstance(content, str):
                    raise CorpusError(f"{where}: messages[{i}].content is not text")
                if not content.strip():
                    chat.dropped["empty"] += 1
                    continue
                chat.messages.append(Message(str(m.get("name") or role), content.strip(), None, role))
            chats.append(chat)
    return chats


# -- SMS Backup & Restore -------------------------------------------------------------------------------


def _sms(path: Path) -> list[Chat]:
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        line, column = err.position
        raise CorpusError(f"{path}:{line}: not valid XML at column {column}: the backup is damaged") from None
    by_contact: dict[str, Chat] = {}
    for node in root:
        address = node.get("address") or "unknown"
        chat = by_contact.setdefault(address, Chat(f"{path}: {address}"))
        if node.tag != "sms":
            chat.dropped["media"] += 1  # mms: pictures and group messages
            continue
        body = (node.get("body") or "").strip()
        if not body:
            chat.dropped["empty"] += 1
            continue
        sent = node.get("type") == "2"
        name = node.get("contact_name")
        other = name if name and name != "(Unknown)" else address
        time = datetime.fromtimestamp(int(node.get("date") or 0) / 1000)
        chat.messages.append(Message(OWNER if sent else other, body, time))
    chats = list(by_contact.values())
    for chat in chats:
        chat.messages.sort(key=lambda m: m.time or datetime.min)
    return chats


# -- privacy, conversations, turns ------------------------------------------------------------------------

_SCRUB = (  # (placeholder, pattern); URLs first: an address inside one is part of it
    ("<url>", re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)),
    ("<email>", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("<phone>", re.compile(r"(?<![\w+])\+?\d[\d\s().-]{5,}\d(?!\w)")),
)


def scrub(text: str, counts: Counter | None = None) -> str:
    """``text`` with URLs, e-mail addresses and phone numbers (7 or more digits) replaced by ``<url>``,
    ``<email>``, ``<phone>``; ``counts`` gets how many of each."""
    for placeholder, pattern in _SCRUB:

        def replace(m: re.Match, placeholder=placeholder) -> str:
            if placeholder == "<phone>" and sum(c.isdigit() for c in m.group(0)) < 7:
                return m.group(0)  # a short number (a time, a price, a year) stays
            if counts is not None:
                counts[placeholder] += 1
            return placeholder

        text = pattern.sub(replace, text)
    return text


@dataclass
class Turn:
    speaker: str
    text: str
    role: str | None = None  # messages JSONL: the messages' role


def conversations(chat: Chat, gap_hours: float = 6.0, merge: bool = True) -> Iterator[list[Turn]]:
    """The chat cut into conversations after a silence of more than ``gap_hours`` (no cut where the format
    has no times), each a list of turns: one speaker's consecutive messages joined by newlines (``merge``),
    else one turn per message."""
    turns: list[Turn] = []
    last: datetime | None = None
    for m in chat.messages:
        if turns and m.time is not None and last is not None and m.time - last > timedelta(hours=gap_hours):
            yield turns
            turns = []
        if merge and turns and turns[-1].speaker == m.sender and turns[-1].role == m.role:
            turns[-1].text += "\n" + m.text
        else:
            turns.append(Turn(m.sender, m.text, m.role))
        last = m.time or last
    if turns:
        yield turns


def speaker_counts(chats: Iterable[Chat]) -> Counter:
    """Messages per speaker over the chats (what a bad ``data.chat.speaker`` lists)."""
    return sum((c.speakers() for c in chats), Counter())


def check_speaker(speaker: str, chats: list[Chat], source: str) -> None:
    """The persona must be one of the chats' speakers; else one line listing them with their message counts."""
    counts = speaker_counts(chats)
    if speaker not in counts:
        found = ", ".join(f"{name!r} ({n} messages)" for name, n in counts.most_common())
        raise CorpusError(f"{source}: data.chat.speaker={speaker!r} never writes here; the speakers are {found}")
    if len(counts) < 2:
        raise CorpusError(f"{source}: only {speaker!r} speaks in this chat: a chat needs someone to answer")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counter.most_common())
