"""GGUF export (``export.gguf``), checked in llama.cpp itself (llama-cpp-python builds it from source).

References: llama.cpp's greedy tokens on the f32 file equal transformers ``generate``'s, on the tiny
test model and on the quickstart model; llama.cpp tokenizes odd text exactly as the ``tokenizers``
library does. Quantized files load and generate. What llama.cpp cannot run is refused in one line
before anything is written, and an earlier export is left as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from penwright.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "artifacts" / "model"
ODD_TEXTS = [
    "  two  spaces\n\n\ttab then\r\nCRLF",
    "trailing space ",
    " leading",
    "   ",
    "\n",
    "hello\n \n  world",
    "emoji 👍🏽 🇫🇷 ok",
    "日本語のテキスト",
    "Ελληνικά и русский",
    "हिन्दी",
    "مرحبا بالعالم",
    "don't I'LL we've 's 'S",
    "12345 3.14159",
    "e\u0301 combining",
    "\u00a0nbsp\u2003em",
    "a\u200db zero-width",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "x" * 60,
]
PROMPTS = ["The quick brown fox", "It is", "In the beginning"]


def export_with_gguf(tmp_path: Path, model_dir: Path, *types: str, out: str = "onnx", extra=()) -> dict:
    from penwright.core.config import compose
    from penwright.export.stage import export

    return export(
        compose(
            [
                f"train.out_dir={model_dir}",
                f"export.out_dir={tmp_path / out}",
                f"paths.reports={tmp_path / 'reports'}",
                f"export.gguf=[{','.join(types)}]",
                "export.quantize=[]",
                "export.parity_prompts=[It is,The quick brown fox jumps]",
                "export.parity_new_tokens=4",
                *extra,
            ],
            config_dir=REPO / "conf",
        )
    )


def llama(path: Path, repack: bool = True, **kwargs):
    from penwright.export.gguf import load_llama

    return load_llama(path, repack=repack, **kwargs)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


def transformers_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def check_greedy_and_tokens(model_dir: Path, gguf: Path, prompts: list[str], n: int) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    llm = llama(gguf, n_ctx=model.config.n_positions, n_threads=2)
    for prompt in prompts:
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids, prompt
        assert llama_greedy(llm, ids, n) == transformers_greedy(model, ids, n), prompt
    vocab = llama(gguf, vocab_only=True)
    for text in ODD_TEXTS:
        ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
        assert ids == tok.encode(text), repr(text)
        assert vocab.detokenize(ids).decode("utf-8") == text
    special = tok.eos_token + "literal"  # a special token written in the text: both parse it as that token
    assert vocab.tokenize(special.encode(), add_bos=False, special=True) == tok.encode(special)


def test_gguf_in_llama_cpp_matches_transformers_on_the_tiny_model(tmp_path, tiny_gpt2):
    report = export_with_gguf(tmp_path, tiny_gpt2, "f32", "f16", "q8_0", "q4_0")
    files = {g["type"]: tmp_path / "onnx" / g["file"] for g in report["gguf"]}
    assert sorted(files) == ["f16", "f32", "q4_0", "q8_0"] and all(p.is_file() for p in files.values())
    sizes = {t: p.stat().st_size for t, p in files.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]
    assert (tmp_path / "onnx" / "model.onnx").is_file()  # beside the ONNX graph, which is unchanged in kind
    modelfile = (tmp_path / "onnx" / "Modelfile").read_text()  # for Ollama: the first type, stopping at EOS
    assert "FROM ./model.f32.gguf\n" in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    check_greedy_and_tokens(tiny_gpt2, files["f32"], PROMPTS, 16)
    # quantized files load and generate in llama.cpp (their agreement with fp32 is in bench generate's report)
    for kind in ("q8_0", "q4_0"):
        llm = llama(files[kind], repack=False, n_ctx=64, n_threads=2)
        assert len(llama_greedy(llm, [5, 6, 7], 8)) == 8


@pytest.mark.skipif(not (QUICKSTART / "config.json").is_file(), reason="the quickstart model: run `dvc repro` first")
def test_gguf_in_llama_cpp_matches_transformers_on_the_quickstart_model(tmp_path):
    from transformers import GPT2LMHeadModel

    from penwright.export.gguf import export_gguf

    model = GPT2LMHeadModel.from_pretrained(QUICKSTART).eval()
    (written,) = export_gguf(model, QUICKSTART, tmp_path, ["f32"])
    check_greedy_and_tokens(
        QUICKSTART,
        tmp_path / written["file"],
        ["And it came to pass", "In the beginning God", "The LORD is my shepherd; "],
        32,
    )


def test_an_unknown_gguf_type_is_refused_and_the_earlier_export_kept(tmp_path, tiny_gpt2):
    export_with_gguf(tmp_path, tiny_gpt2, "f16")

    def files():  # every file of the export, its onnx/ folder too
        return {p: p.read_bytes() for p in sorted((tmp_path / "onnx").rglob("*")) if p.is_file()}

    before = files()
    with pytest.raises(
        ConfigError, match=r"export.gguf=\['q5_k'\]: item 0 \('q5_k'\) not one of .* f32, f16, q8_0, q4_0"
    ):
        export_with_gguf(tmp_path, tiny_gpt2, "q5_k")
    assert files() == before


def test_a_model_llama_cpp_cannot_express_is_refused_before_any_work(tmp_path, tiny_gpt2):
    from transformers import GPT2LMHeadModel

    relu = tmp_path / "relu"
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    model.config.activation_function = "relu"
    model.save_pretrained(relu)
    for f in tiny_gpt2.glob("tokenizer*"):
        (relu / f.name).write_bytes(f.read_bytes())
    with pytest.raises(
        ConfigError,
        match=r"export.gguf=\['f16'\]: llama.cpp cannot run this model "
        r"\(activation_function=relu\); set export.gguf=\[\]",
    ):
        export_with_gguf(tmp_path, relu, "f16")
    assert not (tmp_path / "onnx").exists()

    narrow = tmp_path / "narrow"  # 48 wide: q8_0 blocks of 32 do not divide it, f16 does
    config = model.config
    config.activation_function, config.n_embd, config.n_head = "gelu_new", 48, 2
    GPT2LMHeadModel(config).save_pretrained(narrow)
    for f in tiny_gpt2.glob("tokenizer*"):
        (narrow / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match=r"n_embd=48 .* not a multiple of 32: use f16 or f32"):
        export_with_gguf(tmp_path, narrow, "q8_0")
    assert not (tmp_path / "onnx").exists()
    report = export_with_gguf(tmp_path, narrow, "f16")
    assert (tmp_path / "onnx" / report["gguf"][0]["file"]).is_file()


def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused(tmp_path):
    from transformers import GPT2Config

    from penwright.export.gguf import why_not

    config = GPT2Config(n_embd=64, n_head=2)
    bpe = {
        "model": {"type": "BPE", "vocab": {"<|endoftext|>": 50256}, "merges": []},
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    }
    assert why_not(config, bpe, ["f32"]) is None
    assert "prefix space" in why_not(
        config, {**bpe, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}, ["f32"]
    )
    assert "normalizes" in why_not(config, {**bpe, "normalizer": {"type": "NFC"}}, ["f32"])
    assert "byte-level BPE" in why_not(config, {**bpe, "model": {"type": "WordPiece"}}, ["f32"])


def test_the_benchmark_says_how_to_get_llama_cpp_when_it_is_missing(tmp_path, repo):
    """`python -m benchmarks generate` compares with llama.cpp's own tools: without them it stops at once, in one
    line that says how to build them or leave llama.cpp out, and writes nothing."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "generate",
            "--llama-cpp",
            str(tmp_path / "no-llama"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "llama-bench, llama-batched-bench not found" in lines[0]
    assert "scripts/build_llama_cpp.sh" in lines[0] and "--without-llama-cpp" in lines[0]
    assert not out.exists()


def test_added_tokens_stay_whole_and_mismatched_tokenizers_are_refused(tmp_path, tiny_gpt2):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from penwright.export.gguf import export_gguf

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.add_tokens(["<|sep|>", "foo bar"])  # added, not special: transformers matches them whole in the text
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    model.resize_token_embeddings(len(tok))
    src = tmp_path / "added"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    (written,) = export_gguf(model, src, tmp_path, ["f32"])
    vocab = llama(tmp_path / written["file"], vocab_only=True)
    for text in ("a <|sep|> b", "x foo bar y", "foo barfoo bar"):
        ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
        assert ids == tok.encode(text), text
        assert vocab.detokenize(ids).decode("utf-8") == text

    model.config.vocab_size = len(tok) - 1  # a tokenizer with more ids than the model has rows
    with pytest.raises(ConfigError, match=r"tokenizer has ids up to \d+ but the model's vocabulary is \d+"):
        export_gguf(model, src, tmp_path / "x", ["f32"])
    model.config.vocab_size, model.config.eos_token_id = len(tok), None
    bare = tmp_path / "bare"  # no eos in the config and no <|endoftext|> in the tokenizer
    bare.mkdir()
    text = (src / "tokenizer.json").read_text().replace("<|endoftext|>", "<|end|>")
    (bare / "tokenizer.json").write_text(text)
    with pytest.raises(ConfigError, match="no end-of-text token"):
        export_gguf(model, bare, tmp_path / "x", ["f32"])


def test_an_end_of_text_id_outside_the_tokenizer_is_refused_before_any_work(tmp_path, tiny_gpt2):
    from transformers import GPT2LMHeadModel

    odd = tmp_path / "odd-eos"
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    model.config.eos_token_id = 5000  # e.g. GPT-2's config over another tokenizer
    model.save_pretrained(odd)
    for f in tiny_gpt2.glob("tokenizer*"):
        (odd / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match=r"end-of-text id 5000 .* is not a token of its tokenizer"):
        export_with_gguf(tmp_path, odd, "f16")
    assert not (tmp_path / "onnx").exists()
