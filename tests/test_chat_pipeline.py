"""A chat export end to end, on the sample chat (the Book of Job as WhatsApp and messages exports) and a tiny model:
prepare writes exactly the ids transformers' ``apply_chat_template`` gives and masks all but the persona's turns;
training counts only those (and resumes bit-exact); the exported model talks through ``penwright chat``,
``/v1/chat/completions`` (the openai client) and llama.cpp (the GGUF's own template) with transformers' greedy
reply; the Ollama Modelfile's TEMPLATE writes what the Jinja template writes; bad exports stop in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from conftest import RunningServer
from transformers import AutoTokenizer, GPT2LMHeadModel

from helpers.go_template import render_go
from helpers.paths import REPO
from helpers.tiny import TINY_MODEL, TINY_TRAIN
from helpers.train_outputs import curve, weights
from penwright.core.chat_format import EOS, ChatFormat
from penwright.core.config import compose
from penwright.core.copy_index import CopyIndex
from penwright.core.errors import CorpusError
from penwright.prepare import kjv
from penwright.prepare.chat_corpus import read_corpus
from penwright.prepare.stage import prepare, split_documents

QUESTION = [{"role": "user", "content": "What is man?"}]
GROUP = [  # short: the tiny model's context is 64 tokens
    {"role": "system", "content": "Friends."},
    {"role": "user", "name": "Bildad", "content": "Speak."},
    {"role": "assistant", "content": "I know."},
    {"role": "user", "content": "Hear."},
]


@pytest.fixture(scope="session")
def job_chat(tmp_path_factory) -> dict[str, Path]:
    """The sample chat as ``penwright corpus`` writes it: WhatsApp's Android export and a messages JSONL."""
    root = tmp_path_factory.mktemp("job-chat")
    conversations = kjv.job_conversations(kjv.read_bible(kjv.database_path()))
    (root / "job-whatsapp.txt").write_text(kjv.render_whatsapp(conversations), encoding="utf-8")
    (root / "job-messages.jsonl").write_text(kjv.render_messages(conversations), encoding="utf-8")
    return {"whatsapp": root / "job-whatsapp.txt", "messages": root / "job-messages.jsonl"}


def chat_config(corpus: Path, out: Path, tiny_gpt2: Path, *overrides: str):
    return compose(
        [
            f"data.path={corpus}",
            f"data.out_dir={out}",
            "data.val_fraction=0.1",
            "data.chat.speaker=Job",
            "model=gpt2",
            f"model.name_or_path={tiny_gpt2}",
            *overrides,
        ],
        config_dir=REPO / "conf",
    )


@pytest.fixture(scope="session")
def chat_prepared(tmp_path_factory, tiny_gpt2, job_chat) -> Path:
    out = tmp_path_factory.mktemp("chat-prepared") / "prepared"
    prepare(chat_config(job_chat["whatsapp"], out, tiny_gpt2))
    return out


def train_chat(prepared: Path, run: Path, *overrides: str) -> dict:
    from penwright.train.stage import train

    return train(
        compose(
            [
                f"data.out_dir={prepared}",
                f"train.ckpt_dir={run}/ckpt",
                f"train.out_dir={run}/model",
                f"paths.reports={run}/reports",
                *([] if any(o.startswith("model=") for o in overrides) else TINY_MODEL),
                *TINY_TRAIN,
                "sample.temperatures=[1.0]",
                *overrides,
            ],
            config_dir=REPO / "conf",
        )
    )


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tiny_gpt2, chat_prepared) -> dict[str, Path]:
    """The tiny GPT-2 finetuned 4 steps on the chat (gently: its random weights keep replies that differ from
    prompt to prompt, so a wrong prompt shows), exported to ONNX and to an f32 GGUF."""
    from penwright.export.stage import export

    root = tmp_path_factory.mktemp("chat-model")
    train_chat(
        chat_prepared, root, "model=gpt2", f"model.name_or_path={tiny_gpt2}", "train.lr=1e-5", "trainer.max_steps=4"
    )
    export(
        compose(
            [
                f"train.out_dir={root / 'model'}",
                f"export.out_dir={root / 'onnx'}",
                f"paths.reports={root / 'reports'}",
                "export.gguf=[f32]",
                "export.quantize=[]",
                "export.parity_prompts=[Eliphaz said,Job said]",
                "export.parity_new_tokens=4",
            ],
            config_dir=REPO / "conf",
        )
    )
    return {"model": root / "model", "onnx": root / "onnx", "reports": root / "reports"}


def greedy_reply(model_dir: Path, messages: list[dict], n: int) -> str:
    """transformers' greedy reply to ``messages`` under the saved template, cut at the end of the persona's turn;
    the oldest messages are left out until the prompt and the reply fit in the context."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    for first in range(len(messages)):
        ids = tok.apply_chat_template(messages[first:], add_generation_prompt=True, return_dict=False)
        if len(ids) + n <= model.config.n_positions:
            break
    reply = greedy_ids(model, ids, n, stop=tok.eos_token_id)
    return tok.decode([t for t in reply if t != tok.eos_token_id])


def greedy_ids(model, ids: list[int], n: int, stop: int | None = None) -> list[int]:
    """transformers' greedy tokens after ``ids``; every prompt token attended (an <|endoftext|> inside a chat prompt
    is a turn's end, not padding)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=0 if stop is not None else n,
            eos_token_id=stop,
            pad_token_id=model.config.eos_token_id,
        )
    return out[0, len(ids) :].tolist()


# -- prepare ---------------------------------------------------------------------------------------------


def test_training_ids_are_the_chat_template_ids_and_the_mask_covers_the_personas_turns(chat_prepared, job_chat):
    tokenizer_dir = chat_prepared / "tokenizer"
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ChatFormat("Job", "Eliphaz").jinja()  # inline: transformers.js reads it
    assert not (tokenizer_dir / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    meta = json.loads((chat_prepared / "meta.json").read_text())
    cfg = compose(["data.chat.speaker=Job"], config_dir=REPO / "conf")
    corpus = read_corpus([(str(job_chat["whatsapp"]), "whatsapp")], cfg.data.chat, "job")
    is_val = split_documents(len(corpus.documents), 0.1, meta["split"]["seed"])
    for split, want in (("train", False), ("val", True)):
        docs = [d for d, v in zip(corpus.documents, is_val) if v == want]
        expected: list[int] = []
        persona = ""
        for doc in docs:
            ids = tok.apply_chat_template(doc, return_dict=False)  # transformers' own rendering and tokenizing
            expected += ids if ids[-1] == tok.eos_token_id else [*ids, tok.eos_token_id]
            persona += "".join(f" {m['content']}{EOS}" for m in doc if m["role"] == "assistant")
        tokens = np.fromfile(chat_prepared / f"{split}.bin", dtype=np.uint16)
        mask = np.fromfile(chat_prepared / f"{split}.mask", dtype=np.uint8)
        assert tokens.tolist() == expected and mask.size == tokens.size
        assert tok.decode(tokens[mask == 1].tolist()) == persona  # the loss sees Job's words and his turn's end
        assert meta[split]["loss_tokens"] == int(mask.sum())
        assert meta[split]["loss_bytes"] == len(persona.replace(EOS, "").encode())
    index = CopyIndex(chat_prepared)  # one document a conversation, though each of Job's turns ends with EOS
    train_docs = [k for k, v in enumerate(is_val) if not v]
    assert index.names == [f"conversation {k + 1} of {len(corpus.documents)}" for k in train_docs]
    doc = len(train_docs) // 2
    ids = tok.apply_chat_template(corpus.documents[train_docs[doc]], return_dict=False)
    assert index.document_of(index.locate(ids, 0, len(ids))) == (doc, 0)
    chat = meta["chat"]
    assert chat["persona"] == "Job" and chat["other"] == "Eliphaz" and chat["mask"] is True
    assert chat["dropped"] == {} and chat["conversations_without_persona"] > 0  # the friends' passages alone
    assert len(json.loads((chat_prepared / "openings.json").read_text())) >= 1


def test_whatsapp_and_messages_exports_prepare_to_the_same_tokens(tmp_path, tiny_gpt2, job_chat, chat_prepared):
    out = tmp_path / "prepared"
    prepare(chat_config(job_chat["messages"], out, tiny_gpt2))  # format detected: {"messages": [...]} records
    for name in ("train.bin", "val.bin", "train.mask", "val.mask"):
        assert (out / name).read_bytes() == (chat_prepared / name).read_bytes(), name


def test_loss_on_all_writes_no_mask_and_counts_every_token(tmp_path, tiny_gpt2, job_chat):
    out = tmp_path / "prepared"
    meta = prepare(chat_config(job_chat["whatsapp"], out, tiny_gpt2, "data.chat.loss_on=all"))
    assert not (out / "train.mask").exists() and meta["chat"]["mask"] is False
    assert meta["chat"]["conversations_without_persona"] == 0  # every conversation is kept
    assert meta["train"]["loss_tokens"] < meta["train"]["tokens"]  # (the EOS after another's turn is no text)


def test_scrub_replaces_numbers_addresses_and_links_and_counts_them(tmp_path, tiny_gpt2):
    export = tmp_path / "chat.txt"
    export.write_text(
        "3/1/24, 9:00 AM - Ann: call me on +44 20 7946 0958\n"
        "3/1/24, 9:01 AM - Bob: or write to bob@example.org, see https://example.org/x\n"
        "3/1/24, 9:02 AM - Ann: <Media omitted>\n"
        "3/1/24, 9:03 AM - Ann: fine\n",
        encoding="utf-8",
    )
    out = tmp_path / "prepared"
    meta = prepare(chat_config(export, out, tiny_gpt2, "data.chat.speaker=Bob", "data.val_fraction=0"))
    text = AutoTokenizer.from_pretrained(out / "tokenizer").decode(np.fromfile(out / "train.bin", dtype=np.uint16))
    assert "7946" not in text and "example.org" not in text
    assert "<phone>" in text and "<email>" in text and "<url>" in text
    assert meta["chat"]["scrubbed"] == {"<phone>": 1, "<email>": 1, "<url>": 1}
    assert meta["chat"]["dropped"] == {"media": 1}


def test_telegram_and_sms_exports_prepare_with_their_speakers(tmp_path, tiny_gpt2):
    telegram = tmp_path / "result.json"
    telegram.write_text(
        json.dumps(
            {
                "name": "Ann",
                "type": "personal_chat",
                "messages": [
                    {"id": 1, "type": "service", "action": "phone_call", "date": "2024-03-01T09:00:00"},
                    {"id": 2, "type": "message", "from": "Ann", "date": "2024-03-01T09:01:00", "text": "hello"},
                    {
                        "id": 3,
                        "type": "message",
                        "from": "Bob",
                        "date": "2024-03-01T09:02:00",
                        "text": ["see ", {"type": "bold", "text": "this"}],
                    },
                    {
                        "id": 4,
                        "type": "message",
                        "from": "Bob",
                        "date": "2024-03-01T09:03:00",
                        "text": "",
                        "photo": "x.jpg",
                    },
                ],
            }
        )
    )
    out = tmp_path / "telegram"
    meta = prepare(chat_config(telegram, out, tiny_gpt2, "data.chat.speaker=Bob", "data.val_fraction=0"))
    text = AutoTokenizer.from_pretrained(out / "tokenizer").decode(np.fromfile(out / "train.bin", dtype=np.uint16))
    assert text == f"Ann: hello\nBob: see this{EOS}" and meta["chat"]["dropped"] == {"system": 1, "media": 1}
    sms = tmp_path / "sms.xml"
    sms.write_text(
        "<?xml version='1.0' encoding='UTF-8'?>\n<smses count='4'>\n"
        '<sms address="+15551234567" contact_name="Ann" date="1709283600000" type="1" body="are you up?" />\n'
        '<sms address="+15551234567" contact_name="Ann" date="1709283660000" type="2" body="yes" />\n'
        '<sms address="+15557654321" contact_name="Cy" date="1709283720000" type="1" body="lunch?" />\n'
        '<sms address="+15557654321" contact_name="Cy" date="1709283780000" type="2" body="sure" />\n'
        "</smses>\n"
    )
    out = tmp_path / "sms"
    meta = prepare(chat_config(sms, out, tiny_gpt2, "data.chat.speaker=null", "data.val_fraction=0.5"))
    assert meta["chat"]["persona"] == "me" and meta["chat"]["conversations"] == 2  # one per contact
    config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert ChatFormat.parse(config["chat_template"]).persona == "me"


def test_formats_are_told_apart_by_their_content(tmp_path):
    from penwright.prepare.corpus import CorpusSpec, find_files

    (tmp_path / "wa.txt").write_text("12/24/19, 9:41 PM - Ann: hi\n")
    (tmp_path / "essay.txt").write_text("An essay, not a chat.\n")
    (tmp_path / "result.json").write_text('{"name": "Ann", "messages": []}')
    (tmp_path / "sms.xml").write_text("<?xml version='1.0'?><smses count='0'></smses>")
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    found = {p.name: fmt for p, fmt in find_files(CorpusSpec(path=str(tmp_path), glob="*"))}
    assert found == {
        "wa.txt": "whatsapp",
        "essay.txt": "text",
        "result.json": "telegram",
        "sms.xml": "sms",
        "chat.jsonl": "messages",
        "docs.jsonl": "jsonl",
    }


def test_bad_chat_inputs_stop_in_one_line_and_leave_the_earlier_output(tmp_path, tiny_gpt2, job_chat, chat_prepared):
    out = tmp_path / "prepared"
    prepare(chat_config(job_chat["whatsapp"], out, tiny_gpt2))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def refused(corpus: Path, *overrides: str) -> str:
        with pytest.raises(CorpusError) as err:
            prepare(chat_config(corpus, out, tiny_gpt2, *overrides))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "'Eliphaz' (" in refused(job_chat["whatsapp"], "data.chat.speaker=Satan")  # the speakers, with counts
    assert "never writes here" in refused(job_chat["whatsapp"], "data.chat.speaker=Satan")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text(job_chat["whatsapp"].read_text())
    (mixed / "b.txt").write_text("a document\n")
    assert "chat exports and documents together" in refused(mixed, "data.glob=*.txt")
    one = tmp_path / "one.txt"
    one.write_text("3/1/24, 9:00 AM - Job: alone\n3/1/24, 9:01 AM - Job: still alone\n")
    assert "a chat needs someone to answer" in refused(one)
    late = tmp_path / "late.jsonl"  # Job speaks only in the first of 20 conversations: not in val
    rows = [{"messages": [{"role": "user", "name": "Ann", "content": "hi"}]}] * 19
    rows.insert(
        0,
        {
            "messages": [
                {"role": "user", "name": "Ann", "content": "hi"},
                {"role": "assistant", "name": "Job", "content": "yo"},
            ]
        },
    )
    late.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "no turns in the val split" in refused(late, "data.chat.loss_on=all", "data.val_fraction=0.5")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in refused(empty, "data.format=whatsapp")
    cut = tmp_path / "result.json"
    cut.write_text('{\n "name": "Ann",\n "type": "personal_chat",\n "messages": [\n  {"id": 1, "type": "message", "te')
    assert "result.json: not valid JSON at line 5, column" in refused(cut)  # Telegram's export, cut short
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# -- train -------------------------------------------------------------------------------------------------


def test_the_masked_loss_counts_only_the_targets_it_keeps():
    from transformers import GPT2Config

    from penwright.core.config import compose as compose_cfg
    from penwright.train.data import IGNORE
    from penwright.train.model import LitGPT2

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    module = LitGPT2(model, compose_cfg([], config_dir=REPO / "conf").train, None).eval()
    ids = torch.randint(0, 50, (2, 9))
    keep = torch.rand(2, 9) > 0.5
    batch = torch.stack([ids, torch.where(keep, ids, IGNORE)], dim=1)
    logits = module(ids[:, :-1]).float()
    kept = keep[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[kept], ids[:, 1:][kept])
    assert torch.allclose(module._loss(batch), expected, atol=1e-6)
    nothing = torch.stack([ids, torch.full_like(ids, IGNORE)], dim=1)
    assert module._loss(nothing).item() == 0.0  # a window without the persona: no NaN


def test_chat_training_resumes_bit_exact_and_samples_the_personas_replies(tmp_path, chat_prepared):
    common = ["train.decay_steps=12", "sample.every_n_steps=6", "sample.max_new_tokens=8"]
    straight = train_chat(chat_prepared, tmp_path / "straight", "trainer.max_steps=12", *common)
    train_chat(chat_prepared, tmp_path / "chunked", "trainer.max_steps=6", *common)
    train_chat(chat_prepared, tmp_path / "chunked", "trainer.max_steps=12", *common)
    assert curve(tmp_path / "straight" / "reports") == curve(tmp_path / "chunked" / "reports")
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "chunked" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((chat_prepared / "meta.json").read_text())
    bpb = straight["val_loss"] / np.log(2) / (meta["val"]["loss_bytes"] / meta["val"]["loss_tokens"])
    assert abs(straight["val_bpb"] - bpb) < 1e-4  # bits per byte of Job's words
    samples = (tmp_path / "straight" / "reports" / "samples" / "step-000012.md").read_text()
    assert "**reply:** " in samples and "\nJob:" in samples  # the context, then Job's reply
    saved = json.loads((tmp_path / "straight" / "model" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == ChatFormat("Job", "Eliphaz").jinja()


# -- talking to it -------------------------------------------------------------------------------------------


def test_penwright_chat_replies_in_the_terminal_as_transformers_would(chat_model):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "penwright.cli",
            "chat",
            f"generate.model_dir={chat_model['onnx']}",
            "generate.do_sample=false",
            "generate.max_new_tokens=12",
        ],
        input="What is man?\nHear me.\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    first = greedy_reply(chat_model["model"], QUESTION, 12)
    second = [*QUESTION, {"role": "assistant", "content": first.strip()}, {"role": "user", "content": "Hear me."}]
    assert run.stdout == f"Job:{first}\nJob:{greedy_reply(chat_model['model'], second, 12)}\n"


def test_chat_completions_reply_as_transformers_and_stop_at_the_end_of_the_turn(chat_model):
    from penwright.core.config import compose as compose_cfg

    server = RunningServer(compose_cfg([f"serve.model_dir={chat_model['onnx']}"], config_dir=REPO / "conf"))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for messages in (QUESTION, GROUP):
            reply = client.chat.completions.create(model="penwright", messages=messages, max_tokens=10, temperature=0)
            assert reply.choices[0].message.content == greedy_reply(chat_model["model"], messages, 10)
            assert EOS not in reply.choices[0].message.content
    finally:
        server.stop()


def test_the_gguf_carries_the_template_and_llama_cpp_replies_like_transformers(chat_model):
    """llama-cpp-python reads the GGUF's ``tokenizer.chat_template`` as its chat format; the prompt it renders, its
    ids and llama.cpp's greedy reply are transformers' (token for token: this random-weighted model's replies are
    not always whole UTF-8, so text would hide a difference)."""
    import gguf
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from test_gguf import llama_greedy

    from penwright.export.gguf import load_llama

    path = chat_model["onnx"] / "model.f32.gguf"
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert template == ChatFormat("Job", "Eliphaz").jinja()
    llm = load_llama(path, n_ctx=64, n_threads=2)
    assert llm.chat_format == "chat_template.default"  # create_chat_completion renders the GGUF's own template
    tok = AutoTokenizer.from_pretrained(chat_model["model"])
    model = GPT2LMHeadModel.from_pretrained(chat_model["model"]).eval()
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=EOS, bos_token=EOS)
    replies = []
    for messages in (QUESTION, GROUP):
        prompt = formatter(messages=messages).prompt
        assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        replies.append(llama_greedy(llm, ids, 10))
        assert replies[-1] == greedy_ids(model, ids, 10)
    assert replies[0] != replies[1]  # the replies depend on the prompt: a wrongly built one would show


def test_the_modelfile_template_writes_what_the_chat_template_writes(chat_model, job_chat):
    modelfile = (chat_model["onnx"] / "Modelfile").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "FROM ./model.f32.gguf" in modelfile
    tok = AutoTokenizer.from_pretrained(chat_model["model"])
    cfg = compose(["data.chat.speaker=Job"], config_dir=REPO / "conf")
    conversations = read_corpus([(str(job_chat["messages"]), "messages")], cfg.data.chat, "job").documents[:20]
    for messages in [QUESTION, [m for m in GROUP if "name" not in m], *conversations]:
        messages = [{k: v for k, v in m.items() if k != "name"} for m in messages]  # Ollama's messages carry none
        assert render_go(template, messages) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def talk(driver, expected_reply) -> None:
    """Two turns said on the page in chat mode; each reply shown is ``expected_reply(conversation)`` (the whole
    conversation so far, the user's turn last)."""
    from selenium.webdriver.common.by import By
    from test_serve_page import generate, set_field, text_of

    conversation: list[dict] = []
    for said in ("What is man?", "Hear."):
        set_field(driver, "prompt", said)
        status, _ = generate(driver)
        assert status.startswith("done"), status
        conversation.append({"role": "user", "content": said})
        expected = expected_reply(conversation)
        assert text_of(driver.find_element(By.ID, "reply")) == expected
        conversation.append({"role": "assistant", "content": expected.strip()})


@pytest.mark.slow
def test_the_page_talks_with_the_persona_in_chat_mode(chat_model, browser):
    """Headless Chromium on the page of a chat model: chat mode by default, each reply streamed from
    /v1/chat/completions is what the API answers to the whole conversation (greedy)."""
    from selenium.webdriver.common.by import By
    from test_serve_page import assert_same_origin, open_page, set_field, text_of

    driver = browser
    server = RunningServer(compose([f"serve.model_dir={chat_model['onnx']}"], config_dir=REPO / "conf"))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        open_page(driver, server)
        assert_same_origin(driver, server.url)
        assert (
            driver.find_element(By.ID, "transcript").is_displayed()
            and not driver.find_element(By.ID, "output").is_displayed()
        )
        assert "Talk with Job" in text_of(driver.find_element(By.ID, "about"))
        for field, value in (("length", "10"), ("temperature", "0"), ("top_k", "40"), ("top_p", "1")):
            set_field(driver, field, value)
        talk(
            driver,
            lambda conversation: (
                client.chat.completions.create(
                    model="penwright",
                    messages=conversation,
                    max_tokens=10,
                    temperature=0,
                    top_p=1,
                    extra_body={"top_k": 40},
                )
                .choices[0]
                .message.content
            ),
        )
        turns = driver.find_elements(By.CSS_SELECTOR, "#transcript .turn")
        assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"] * 2
        assert text_of(turns[0]) == "You: What is man?" and text_of(turns[1]).startswith("Job: ")
        driver.find_element(By.ID, "mode-complete").click()  # the other mode: a text continued, as before
        assert (
            driver.find_element(By.ID, "output").is_displayed()
            and not driver.find_element(By.ID, "transcript").is_displayed()
        )
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
        assert not errors, f"the page logged errors: {errors}"
    finally:
        server.stop()


@pytest.mark.slow
def test_the_static_site_talks_with_the_persona_in_the_browser(chat_model, browser, tmp_path):
    """The site of a chat model (penwright site, fp32): chat mode by default, the chat template rendered in the page
    by @huggingface/jinja, each greedy reply what transformers replies to the whole conversation."""
    from selenium.webdriver.common.by import By
    from test_serve_page import text_of
    from test_site import build

    from penwright.share.site import static_server

    build(chat_model["onnx"], tmp_path / "site", "fp32")
    server = static_server(tmp_path / "site", isolated=False)
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/index.html?max_tokens=10&temperature=0")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 60).until(lambda d: text_of(d.find_element(By.ID, "status")).startswith("ready"))
        assert "Talk with Job" in text_of(browser.find_element(By.ID, "about"))
        talk(browser, lambda conversation: greedy_reply(chat_model["model"], conversation, 10))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        server.shutdown()


LLAMA_SERVER = REPO / ".llama.cpp" / "bin" / "llama-server"


@pytest.mark.skipif(not LLAMA_SERVER.is_file(), reason="llama-server: run scripts/build_llama_cpp.sh")
def test_llama_server_with_jinja_answers_chat_completions_as_penwright_does(chat_model, tmp_path):
    """llama.cpp's own server on the exported GGUF, started with --jinja (the GGUF's template, not its ChatML
    fallback): its rendering of the messages (/apply-template) is transformers', and its greedy chat reply, byte for
    byte (logprobs' raw bytes: a random-weighted model's reply is not always whole UTF-8), is penwright's."""
    import httpx

    from helpers.net import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(LLAMA_SERVER), "-m", str(chat_model["onnx"] / "model.f32.gguf"), "--jinja", "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "-np", "1", "-c", "64", "-t", "2", "--no-webui"]
    if "amx_int8" in Path("/proc/cpuinfo").read_text():
        cmd.append("--no-repack")  # llama.cpp's weight repacking crashes on AMX CPUs
    log = (tmp_path / "llama-server.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    penwright = RunningServer(compose([f"serve.model_dir={chat_model['onnx']}"], config_dir=REPO / "conf"))
    try:
        from benchmarks.common import wait_until_healthy

        wait_until_healthy(url, 120, server)
        tok = AutoTokenizer.from_pretrained(chat_model["model"])
        model = GPT2LMHeadModel.from_pretrained(chat_model["model"]).eval()
        for messages in (QUESTION, GROUP):
            rendered = httpx.post(f"{url}/apply-template", json={"messages": messages}, timeout=60).json()["prompt"]
            assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            body = {"messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": True}
            theirs = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
            ours = httpx.post(f"{penwright.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            reply = [t for t in greedy_ids(model, ids, 10, stop=tok.eos_token_id) if t != tok.eos_token_id]
            expected = raw_bytes(tok, reply)
            assert b"".join(bytes(t["bytes"]) for t in theirs["logprobs"]["content"]) == expected
            assert ours["message"]["content"] == tok.decode(reply)
            assert theirs["finish_reason"] == ours["finish_reason"]
    finally:
        penwright.stop()
        server.terminate()
        server.wait(30)
        log.close()


def raw_bytes(tok, ids: list[int]) -> bytes:
    """The bytes byte-level BPE tokens stand for (GPT-2's printable stand-ins for bytes, undone)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(byte_of[c] for t in tok.convert_ids_to_tokens(ids) for c in t)
