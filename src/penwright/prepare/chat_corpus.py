"""A corpus of chat exports as training documents: one document per conversation, in the chat template.

``read_corpus`` reads every export (``chats.read_chat``), checks the persona (``data.chat.speaker``), scrubs
phone numbers, e-mail addresses and URLs (``data.chat.scrub``), cuts each chat into conversations at long
silences and turns them into messages: the persona's turns are the ``assistant``'s, everyone else's are the
``user``'s with their ``name``. ``openings`` picks the contexts the training samples answer. What was left
out (system lines, media, deleted, empty messages; conversations where the persona never speaks) is counted
for meta.json and the stage's last line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from penwright.core import schema
from penwright.core.chat_format import ChatFormat
from penwright.core.errors import CorpusError
from penwright.prepare.chats import OWNER, Chat, Message, check_speaker, conversations, read_chat, scrub, speaker_counts

DEFAULT_SPEAKER = {"sms": OWNER, "messages": "assistant"}  # formats whose persona needs no name
CONTEXT_TURNS = 6  # an opening (a training sample's prompt) shows at most this many turns before the reply


@dataclass
class ChatCorpus:
    format: ChatFormat
    documents: list[list[dict]]  # conversations as chat messages: {"role", "content", "name"?}
    speakers: Counter  # messages per speaker, over the whole export
    dropped: Counter = field(default_factory=Counter)  # messages left out, by reason
    scrubbed: Counter = field(default_factory=Counter)  # placeholders written, by kind
    without_persona: int = 0  # conversations left out: the persona never speaks in them (loss_on=persona)

    def summary(self) -> dict:
        """What meta.json records of the chats (speakers' names stay out of it: they are in the template)."""
        return {
            "persona": self.format.persona,
            "other": self.format.other,
            "speakers": len(self.speakers),
            "conversations": len(self.documents),
            "persona_turns": sum(m["role"] == "assistant" for d in self.documents for m in d),
            "dropped": dict(self.dropped.most_common()),
            "scrubbed": dict(self.scrubbed.most_common()),
            "conversations_without_persona": self.without_persona,
        }


def read_corpus(files: list[tuple[str, str]], chat: schema.ChatData, where: str) -> ChatCorpus:
    """The conversations of the exports ``files`` (path, format) as ``chat`` says to read them."""
    chats: list[Chat] = []
    for path, fmt in files:
        chats.extend(read_chat(path, fmt))
    formats = {fmt for _, fmt in files}
    speaker = chat.speaker or _default_speaker(formats, chats, where)
    check_speaker(speaker, chats, where)
    speakers = speaker_counts(chats)
    corpus = ChatCorpus(ChatFormat(speaker, ""), [], speakers)
    answered = Counter[str]()  # who speaks right before the persona: the other side a reply answers
    for c in chats:
        corpus.dropped.update(c.dropped)
        if chat.scrub:
            c.messages = [Message(m.sender, scrub(m.text, corpus.scrubbed), m.time, m.role) for m in c.messages]
        for turns in conversations(c, chat.gap_hours, merge=chat.merge_turns):
            messages = [_message(t.speaker, t.text, t.role, speaker) for t in turns]
            answered.update(
                a["name"] for a, b in zip(messages, messages[1:]) if b["role"] == "assistant" and "name" in a
            )
            if chat.loss_on == "persona" and not any(m["role"] == "assistant" for m in messages):
                corpus.without_persona += 1
                continue
            corpus.documents.append(messages)
    others = answered or Counter({name: n for name, n in speakers.items() if name != speaker})
    corpus.format = ChatFormat(speaker, others.most_common(1)[0][0])
    return corpus


def _default_speaker(formats: set[str], chats: list[Chat], where: str) -> str:
    defaults = {DEFAULT_SPEAKER.get(f) for f in formats}
    if len(defaults) == 1 and None not in defaults:
        return defaults.pop()  # type: ignore[return-value]
    found = ", ".join(f"{name!r} ({n} messages)" for name, n in speaker_counts(chats).most_common())
    raise CorpusError(
        f"{where}: set data.chat.speaker to the persona, whose turns the model learns; the speakers are {found}"
    )


def _message(speaker: str, text: str, role: str | None, persona: str) -> dict:
    if role == "system":
        return {"role": "system", "content": text}
    if speaker == persona:
        return {"role": "assistant", "content": text}
    return {"role": "user", "content": text, "name": speaker}


def split_one(documents: list[list[dict]], val_fraction: float) -> list[list[dict]]:
    """A corpus of one conversation splits by turns: its last ``val_fraction`` of messages become a second."""
    (only,) = documents
    if val_fraction <= 0 or len(only) < 2:
        return documents
    cut = min(max(1, round(len(only) * (1 - val_fraction))), len(only) - 1)
    return [only[:cut], only[cut:]]


def openings(documents: list[list[dict]], count: int) -> list[dict]:
    """Up to ``count`` openings for training samples, spread over ``documents`` (the val conversations): the turns
    before a persona turn that follows someone else's (``context``), and what the persona said (``reply``)."""
    found = []
    for doc in documents:
        for i, m in enumerate(doc):
            if m["role"] == "assistant" and i and doc[i - 1]["role"] == "user":
                found.append({"context": doc[max(0, i - CONTEXT_TURNS) : i], "reply": m["content"]})
    if not found or count == 0:
        return []
    step = max(1, len(found) // count)
    return found[::step][:count]
