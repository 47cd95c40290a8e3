"""The llama.cpp side of ``python -m benchmarks generate``, on llama.cpp's real tools.

The tools come from ``scripts/build_llama_cpp.sh`` (~10 min on 2 cores, not part of the setup), so these
tests run where that script was run and skip elsewhere. What they check: each timing is of warm runs (the
first repetition, which runs cold, is dropped) and parses to a positive rate per batch size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2LMHeadModel

from benchmarks.generate import LLAMA_CPP, LLAMA_TOOLS, _llama_batched, _llama_tg, llama_tools

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / LLAMA_CPP
pytestmark = pytest.mark.skipif(
    not all((TOOLS / t).is_file() for t in LLAMA_TOOLS), reason="llama.cpp's tools: run scripts/build_llama_cpp.sh"
)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, tiny_gpt2) -> Path:
    from penwright.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    (written,) = export_gguf(GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval(), tiny_gpt2, out, ["f32"])
    return out / written["file"]


def test_llama_bench_rate_is_the_median_of_warm_repetitions(gguf):
    timed = _llama_tg(llama_tools(TOOLS), gguf, 16, threads=1, reps=4)
    warm = timed["warm_runs"]
    assert len(warm) == 3 and timed["first_run"] > 0 and all(r > 0 for r in warm)
    assert timed["tokens_per_sec"] == sorted(warm)[1]  # the median of the warm ones: the first is not counted


def test_one_repetition_is_refused_since_it_would_be_the_cold_one(gguf):
    with pytest.raises(ValueError, match="reps=1"):
        _llama_tg(llama_tools(TOOLS), gguf, 16, threads=1, reps=1)


def test_llama_batched_bench_gives_one_warm_rate_per_batch(gguf):
    rates = _llama_batched(llama_tools(TOOLS), gguf, prompt=4, n=8, batches=[2, 4], threads=1, reps=2)
    assert set(rates) == {2, 4} and all(r > 0 for r in rates.values())


@pytest.mark.skipif(not (TOOLS / "llama-server").is_file(), reason="llama-server: run scripts/build_llama_cpp.sh")
def test_bench_serve_against_llama_server_answers_every_request(tmp_path, tiny_gpt2, onnx_tiny):
    import json

    from benchmarks import bench_serve_llama

    out = tmp_path / "bench_serve.json"
    out.write_text(json.dumps({"models": {"kept": True}}))  # the rest of the serve report stays
    section = bench_serve_llama(
        output=str(out),
        quick_onnx=str(onnx_tiny),
        quick_hf=str(tiny_gpt2),
        llama_cpp=TOOLS,
        repetitions=2,
        models=("quickstart",),
        precisions=("fp32",),
        new_tokens=8,
        slots=2,
        levels={"quickstart": (1, 2)},
        work_dir=tmp_path / "work",
    )
    report = json.loads(out.read_text())
    assert report["models"] == {"kept": True} and report["llama_server"] == section
    for level in ("1", "2"):
        row = section["models"]["quickstart"]["fp32"]["levels"][level]
        for server in ("penwright", "llama_server"):
            assert row[server]["failed"] == 0 and row[server]["answered"] == row[server]["sent"] > 0, row[server]
            assert row[server]["repetitions"] == 2 and row[server]["tokens_per_sec"] > 0
        assert row["penwright_over_llama_server"] > 0
