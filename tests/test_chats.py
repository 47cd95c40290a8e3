"""Chat exports read as conversations (prepare/chats.py): the formats phones and apps write, what is dropped
and counted, privacy scrubbing, turns and conversations, and one clear line for each bad input."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime

import pytest

from penwright.core.errors import CorpusError
from penwright.prepare.chats import (
    check_speaker,
    conversations,
    detect_format,
    read_chat,
    scrub,
)

M = "\u200e"  # the invisible mark iOS writes

ANDROID = """12/24/19, 9:41 PM - Messages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them. Tap to learn more.
12/24/19, 9:41 PM - Ann created group "Family"
12/24/19, 9:42 PM - Ann added Bob
12/24/19, 9:43 PM - Ann: Merry Christmas!
Did you get the parcel?
12/24/19, 9:44 PM - Bob: <Media omitted>
12/24/19, 9:45 PM - Bob: Yes, thanks 🎄
12/24/19, 9:46 PM - Cy: This message was deleted
12/24/19, 9:47 PM - Cy: Call me at +1 (555) 123-4567 or cy@example.com
12/25/19, 10:02 AM - Ann changed the subject from "Family" to "Family 🎅"
12/26/19, 8:15 AM - Bob: Back home: see https://example.com/photos?id=3
"""

IOS = f"""[24.12.19, 21:41:03] Family: {M}Messages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them.
[24.12.19, 21:41:05] Ann: Merry Christmas!
[24.12.19, 21:42:10] {M}Bob: {M}image omitted
[24.12.19, 21:42:30] Bob: Thanks!
It arrived today.
[24.12.19, 21:43:00] Ann: {M}This message was deleted.
[13.01.20, 08:00:00] {M}Bob: Happy new year
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_android_group_chat(tmp_path):
    (chat,) = read_chat(write(tmp_path, "WhatsApp Chat with Family.txt", ANDROID))
    assert [(m.sender, m.text) for m in chat.messages] == [
        ("Ann", "Merry Christmas!\nDid you get the parcel?"),  # over two lines
        ("Bob", "Yes, thanks 🎄"),  # emoji kept as text
        ("Cy", "Call me at +1 (555) 123-4567 or cy@example.com"),  # (scrubbing is prepare's: below)
        ("Bob", "Back home: see https://example.com/photos?id=3"),  # a colon in the text stays
    ]
    assert chat.dropped == Counter(system=4, media=1, deleted=1)
    assert chat.messages[0].time == datetime(2019, 12, 24, 21, 43)  # month-first, 12-hour clock
    assert chat.messages[-1].time == datetime(2019, 12, 26, 8, 15)
    assert chat.speakers() == Counter(Bob=2, Ann=1, Cy=1)


def test_ios_day_first_24_hour_with_marks(tmp_path):
    (chat,) = read_chat(write(tmp_path, "_chat.txt", IOS))
    assert [(m.sender, m.text) for m in chat.messages] == [
        ("Ann", "Merry Christmas!"),
        ("Bob", "Thanks!\nIt arrived today."),
        ("Bob", "Happy new year"),
    ]
    assert chat.dropped == Counter(system=1, media=1, deleted=1)
    assert chat.messages[-1].time == datetime(2020, 1, 13, 8, 0, 0)  # 13.01: only day-first parses


def test_ambiguous_dates_take_the_order_in_which_time_runs_forward(tmp_path):
    # every date parses both ways; read month-first, 01/02 -> 02/01 would go back a month
    text = "01/02/20, 10:00 - Ann: one\n02/01/20, 10:00 - Bob: two\n03/01/20, 10:00 - Ann: three\n"
    (chat,) = read_chat(write(tmp_path, "chat.txt", text))
    times = [m.time for m in chat.messages]
    assert times == [datetime(2020, 1, 2, 10), datetime(2020, 2, 1, 10), datetime(2020, 3, 1, 10)]  # month-first


def test_a_4_digit_year_and_24_hour_android_clock(tmp_path):
    (chat,) = read_chat(write(tmp_path, "chat.txt", "24/12/2019, 21:41 - Ann: hi\n24/12/2019, 21:42 - Bob: hello\n"))
    assert [m.time for m in chat.messages] == [datetime(2019, 12, 24, 21, 41), datetime(2019, 12, 24, 21, 42)]


def test_telegram_one_chat_and_the_whole_account(tmp_path):
    one = {
        "name": "Bob",
        "type": "personal_chat",
        "messages": [
            {
                "id": 1,
                "type": "service",
                "date": "2019-12-24T21:40:00",
                "actor": "Ann",
                "action": "phone_call",
                "text": "",
            },
            {"id": 2, "type": "message", "date": "2019-12-24T21:41:03", "from": "Ann", "text": "Merry Christmas!"},
            {
                "id": 3,
                "type": "message",
                "date": "2019-12-24T21:42:00",
                "from": "Bob",
                "text": ["See ", {"type": "link", "text": "example.com"}, " ", {"type": "bold", "text": "now"}],
            },
            {"id": 4, "type": "message", "date": "2019-12-24T21:43:00", "from": "Bob", "photo": "p.jpg", "text": ""},
        ],
    }
    (chat,) = read_chat(write(tmp_path, "result.json", json.dumps(one)))
    assert [(m.sender, m.text) for m in chat.messages] == [("Ann", "Merry Christmas!"), ("Bob", "See example.com now")]
    assert chat.dropped == Counter(system=1, media=1)
    account = {
        "about": "...",
        "chats": {"about": "...", "list": [one, {**one, "name": "Cy", "messages": one["messages"][1:2]}]},
    }
    chats = read_chat(write(tmp_path, "all.json", json.dumps(account)))
    assert [len(c.messages) for c in chats] == [2, 1] and "'Cy'" in chats[1].source


def test_messages_jsonl(tmp_path):
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hey", "name": "Bob"},
                {"role": "assistant", "content": "Yo", "name": "Ann"},
            ]
        },
    ]
    path = write(tmp_path, "train.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    chats = read_chat(path)
    assert [[(m.sender, m.role) for m in c.messages] for c in chats] == [
        [("system", "system"), ("user", "user"), ("assistant", "assistant")],
        [("Bob", "user"), ("Ann", "assistant")],
    ]
    bad = write(tmp_path, "bad.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: messages\[0\].role='bot': use one of system, user, assistant"):
        read_chat(bad)


def test_sms_backup(tmp_path):
    xml = """<?xml version='1.0' encoding='UTF-8' standalone='yes' ?>
<smses count="4">
  <sms protocol="0" address="+15551234567" date="1577223663000" type="1" body="Are you coming?" contact_name="Bob" />
  <sms protocol="0" address="+15551234567" date="1577223700000" type="2" body="On my way" contact_name="Bob" />
  <mms address="+15551234567" date="1577223800000" />
  <sms protocol="0" address="+15559999999" date="1577223900000" type="1" body="Wrong number?" contact_name="(Unknown)" />
</smses>
"""
    chats = read_chat(write(tmp_path, "sms-20200101.xml", xml))
    assert [[(m.sender, m.text) for m in c.messages] for c in chats] == [
        [("Bob", "Are you coming?"), ("me", "On my way")],
        [("+15559999999", "Wrong number?")],
    ]
    assert chats[0].dropped == Counter(media=1)


def test_formats_are_detected_and_an_unknown_file_is_refused(tmp_path):
    assert detect_format(write(tmp_path, "a.txt", ANDROID)) == "whatsapp"
    assert detect_format(write(tmp_path, "b.txt", IOS)) == "whatsapp"
    assert detect_format(write(tmp_path, "result.json", '{"name": "x", "messages": []}')) == "telegram"
    assert detect_format(write(tmp_path, "c.jsonl", '{"messages": []}\n')) == "messages"
    assert detect_format(write(tmp_path, "d.xml", "<?xml version='1.0'?><smses/>")) == "sms"
    with pytest.raises(CorpusError, match="not a chat export penwright knows; the formats are whatsapp, telegram"):
        read_chat(write(tmp_path, "notes.txt", "Dear diary,\ntoday nothing happened.\n"))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.txt", "", "the export is empty"),
        (
            "cut.json",
            '{"name": "Bob", "messages": [{"id": 1, "type": "mess',
            r"cut.json: not valid JSON at line 1, column \d+",
        ),
        (
            "bad-date.txt",
            "12/24/19, 9:41 PM - Ann: hi\n45/45/19, 9:42 PM - Bob: hi\n",
            r"bad-date.txt:2: the date '45/45/19'",
        ),
        (
            "media.txt",
            "12/24/19, 9:41 PM - Ann: <Media omitted>\n",
            r"no messages with text in this whatsapp export \(1 media left out\)",
        ),
        ("broken.xml", "<?xml version='1.0'?><smses><sms body='x'></smses>", r"broken.xml:1: not valid XML"),
    ],
)
def test_bad_exports_get_one_line_naming_the_file_and_place(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(CorpusError, match=message):
        read_chat(path, "auto" if text else "whatsapp")


def test_scrub_replaces_numbers_addresses_and_links_and_counts_them():
    counts: Counter = Counter()
    text = "Call +1 (555) 123-4567 or 0201 234 5678, mail cy@example.com, see www.example.com/x. At 10:30, 2019, $120."
    assert scrub(text, counts) == "Call <phone> or <phone>, mail <email>, see <url> At 10:30, 2019, $120."
    assert counts == Counter({"<phone>": 2, "<email>": 1, "<url>": 1})


def test_conversations_cut_at_silences_and_turns_join_one_speakers_messages(tmp_path):
    (chat,) = read_chat(write(tmp_path, "chat.txt", ANDROID))
    convs = list(conversations(chat, gap_hours=6))
    assert [[t.speaker for t in c] for c in convs] == [["Ann", "Bob", "Cy"], ["Bob"]]  # 12/24 evening, then 12/26
    assert [[t.speaker for t in c] for c in conversations(chat, gap_hours=48)] == [["Ann", "Bob", "Cy", "Bob"]]
    merged = read_chat(
        write(tmp_path, "m.txt", "12/24/19, 9:41 PM - Ann: a\n12/24/19, 9:42 PM - Ann: b\n12/24/19, 9:43 PM - Bob: c\n")
    )
    assert [(t.speaker, t.text) for t in next(conversations(merged[0]))] == [("Ann", "a\nb"), ("Bob", "c")]


def test_the_persona_must_be_a_speaker(tmp_path):
    chats = read_chat(write(tmp_path, "chat.txt", ANDROID))
    check_speaker("Ann", chats, "chat.txt")
    with pytest.raises(
        CorpusError,
        match=r"data.chat.speaker='Dan' never writes here; the speakers are 'Bob' \(2 messages\), 'Ann' \(1 messages\)",
    ):
        check_speaker("Dan", chats, "chat.txt")
    alone = read_chat(write(tmp_path, "alone.txt", "12/24/19, 9:41 PM - Ann: hello?\n"))
    with pytest.raises(CorpusError, match="only 'Ann' speaks"):
        check_speaker("Ann", alone, "alone.txt")
