"""Each ``python -m benchmarks`` benchmark end to end on tiny inputs (seconds, not the real runs' minutes).

What a benchmark measures cannot be checked here, but its code path can: every stage function it
calls, its child processes and servers, and the report it writes (the keys README and its table read,
with sane values). Reports and scratch files go to tmp_path only, never to reports/ or artifacts/.
"""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest

WORDS = (
    "and it came to pass that the lord said unto moses behold in the beginning god created heaven earth "
    "light darkness waters blessed are they which mourn for they shall be comforted thus saith"
).split()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _report(path, results: dict) -> dict:
    """The written report: what the function returned, as JSON."""
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(results))
    return written


@pytest.fixture
def sample_corpus(tmp_path):
    """A sample corpus laid out as `penwright corpus` writes it: kjv/books/*.txt and kjv/verses.csv (~0.6 MB:
    enough for the encoders' best-of-3 to last milliseconds, which the report rounds to)."""
    rng = random.Random(0)
    verses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "." for _ in range(8000)]
    books = tmp_path / "kjv" / "books"
    books.mkdir(parents=True)
    for i in range(4):
        (books / f"{i:02d}-book.txt").write_text(f"Book {i}\n\n" + " ".join(verses[i::4]) + "\n", encoding="utf-8")
    with open(tmp_path / "kjv" / "verses.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([v] for v in verses)
    return books


def test_bench_prepare(tmp_path, sample_corpus):
    from benchmarks import bench_prepare

    out = tmp_path / "bench_prepare.json"
    # one generated size (the real run's 20 MB and --size-mb are the same code), the runs in this process (seconds
    # less each) but for the import floor and the one-thread encoders: those still get their own processes
    results = _report(
        out,
        bench_prepare(
            size_mb=0.05,
            output=str(out),
            sample=str(sample_corpus),
            base_mb=0.05,
            overrides=["model.tokenizer.vocab_size=300"],
            work_dir=tmp_path / "work",
            isolate=False,
        ),
    )
    assert not (tmp_path / "work").exists()  # scratch removed
    assert _positive(results["import_rss_mb"])
    for key in ("sample", "generated_0.05mb", "generated_0.05mb_tokenizers"):
        run = results[key]
        assert _positive(run["seconds"]) and _positive(run["mb_per_s"]) and run["tokens"] > 0, (key, run)
        assert _positive(run["peak_rss_mb"]), (key, run)
    assert results["sample"]["mb"] > results["generated_0.05mb"]["mb"] >= 0.05
    fast, baseline = results["generated_0.05mb"], results["generated_0.05mb_tokenizers"]
    assert fast["encoder"] != baseline["encoder"] and fast["tokens"] == baseline["tokens"]  # same ids, two encoders
    encoders = results["encoders_on_sample"]
    assert encoders["identical_ids"] is True
    for name in ("splintr", "tokenizers_encode_batch_fast", "splintr_1_thread"):
        assert _positive(encoders[name]["mb_per_s"]), name
    summary = results["summary"]
    assert set(summary) == {
        "mb_per_s_0.05mb",
        "speedup_vs_tokenizers_0.05mb",
        "encoder_alone_mb_per_s_sample",
        "encoder_threads_over_1_thread",
        "peak_rss_mb_sample_vs_20mb_vs_big",
    }
    assert all(_positive(v) for v in summary["peak_rss_mb_sample_vs_20mb_vs_big"])


def test_bench_train_lora(tmp_path, prepared_tiny):
    from benchmarks import bench_lora

    out = tmp_path / "bench_train.json"
    out.write_text(json.dumps({"lightning_over_plain": 1.0}))  # the rest of the report is kept
    section = bench_lora(
        steps=4,
        block=32,
        batch=2,
        output=str(out),
        shapes={"tiny": (1, 2, 32)},
        overrides=[f"data.out_dir={prepared_tiny}"],
    )
    report = json.loads(out.read_text())
    assert report["lightning_over_plain"] == 1.0 and report["lora"] == section
    full, lora = section["tiny"]["full"], section["tiny"]["lora"]
    for row in (full, lora):
        assert all(_positive(row[k]) for k in ("peak_rss_gb", "tokens_per_sec", "checkpoint_mb", "loss_last"))
    assert lora["checkpoint_mb"] < full["checkpoint_mb"] / 10  # the adapters and their optimizer state only
    assert lora["loss_first"] == pytest.approx(full["loss_first"], abs=1e-3)  # the same start
    assert section["tiny"]["lora_over_full"]["checkpoint_size"] < 0.1


def test_bench_train(tmp_path, prepared_tiny):
    from benchmarks import bench_train

    out = tmp_path / "bench_train.json"
    overrides = [
        f"data.out_dir={prepared_tiny}",
        f"paths.reports={tmp_path / 'reports'}",
        "logger=none",
        "model=scratch_small",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.n_positions=64",
        "train.block_size=32",
        "train.batch_size=4",
        "train.warmup_steps=2",
    ]
    results = _report(out, bench_train(steps=2, rounds=2, output=str(out), overrides=overrides))
    assert results["model"]["n_layer"] == 1 and results["batch"] == {"batch_size": 4, "block_size": 32}
    for name in ("lightning", "plain"):
        assert len(results["tokens_per_sec"][name]) == 2 and all(map(_positive, results["tokens_per_sec"][name]))
        assert results["best_tokens_per_sec"][name] == max(results["tokens_per_sec"][name])
    assert _positive(results["lightning_over_plain"])
    assert results["lightning_overhead_pct"] == pytest.approx(100 * (1 - results["lightning_over_plain"]), abs=0.02)
    assert "quickstart_from_reports_train_json" not in results  # no reports/train.json in the tmp reports


def test_bench_generate(tmp_path, tiny_gpt2, onnx_tiny):
    from benchmarks import bench_generate

    out = tmp_path / "bench_generate.json"
    results = _report(
        out,
        bench_generate(
            output=str(out),
            quick_dir=str(tiny_gpt2),
            quick_onnx=str(onnx_tiny),
            new_tokens=4,
            long_tokens=20,
            llama_cpp=None,
            rounds=1,
            big_shape=(1, 2, 32),
            work_dir=tmp_path / "work",
        ),
    )
    assert not (tmp_path / "work").exists()
    assert "llama_cpp" not in results  # llama.cpp left out
    cases = results["cases"]
    assert set(cases) == {
        "quickstart/batch1",
        "quickstart/batch8",
        "gpt2-124m-shape/batch1",
        "gpt2-124m-shape/batch8",
        "gpt2-124m-shape/batch1/20-tokens",
    }
    for key, case in cases.items():
        assert _positive(case["runtime"]["tokens_per_sec"]) and _positive(case["runtime_over_no_cache"]), key
        if "transformers_generate" not in case:
            continue
        assert case["new_tokens"] == 4, key
        for engine in (
            "transformers_generate",
            "runtime_no_cache",
            "runtime_lean_graph",
            "runtime_traced_graph",
            "runtime_int8",
        ):
            assert _positive(case[engine]["tokens_per_sec"]), (key, engine)
        for ratio in (
            "runtime_over_transformers",
            "graph_over_lean_graph",
            "graph_over_traced_graph",
            "runtime_int8_over_transformers",
        ):
            assert _positive(case[ratio]), (key, ratio)
        assert 0 <= case["int8_tokens_agreeing_with_fp32"] <= 1
        assert case["provider"] == "cpu"
    assert cases["quickstart/batch1"]["same_tokens_as_transformers"] is True  # the runtime's greedy tokens
    assert cases["quickstart/batch8"]["traced_graph_same_tokens"] is True
    floor = results["memory_floor"]
    assert floor["model"] == "gpt2-124m-shape" and floor["matrices"] == 5  # 1 layer: 4 matrices, + the output
    assert _positive(floor["ms_per_token"]) and _positive(floor["most_runtime_over_transformers_fp32_batch1"])


def test_bench_serve(tmp_path, onnx_tiny):
    from benchmarks import bench_serve

    out = tmp_path / "bench_serve.json"
    results = _report(
        out,
        bench_serve(
            output=str(out),
            quick_onnx=str(onnx_tiny),
            slots=4,
            levels=(1, 3),
            models=("quickstart",),
            new_tokens=4,
            work_dir=tmp_path / "work",
        ),
    )
    entry = results["models"]["quickstart"]
    assert set(results["models"]) == {"quickstart"}
    assert entry["new_tokens_per_request"] == 4 and entry["slots"] == 4
    assert entry["exit_codes_on_sigterm"] == {"batching": 0, "one_at_a_time": 0}
    assert all(_positive(v) for v in entry["server_rss_mb"].values())
    assert set(entry["levels"]) == {"1", "3"}
    for level, row in entry["levels"].items():
        for label in ("batching", "one_at_a_time"):
            r = row[label]
            assert r["failed"] == 0 and r["errors"] == [] and r["answered"] == r["sent"] >= 8, (level, label, r)
            assert r["completion_tokens"] == 4 * r["sent"] and _positive(r["tokens_per_sec"]), (level, label, r)
            assert 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] and r["latency_p50_s"] <= r["latency_p95_s"], (level, r)
        assert _positive(row["batching_over_one_at_a_time"])


def test_onnxruntime_matmuls_alone_reads_every_weight_matrix_once(tiny_gpt2):
    from transformers import GPT2LMHeadModel

    from benchmarks.generate import _onnxruntime_matmuls

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    cfg = model.config
    timed = _onnxruntime_matmuls(model, rounds=1, steps=2)
    assert timed["matmuls"] == 4 * cfg.n_layer + 1
    per_layer = 3 * cfg.n_embd**2 + cfg.n_embd**2 + 2 * 4 * cfg.n_embd**2  # attention in, out; MLP in, out
    floats = cfg.n_layer * per_layer + cfg.n_embd * cfg.vocab_size
    assert timed["weights_mb"] == round(4 * floats / 1e6, 2)
    assert _positive(timed["ms_per_token"])
    if "skipped" in timed["plain_c"]:  # no C compiler with OpenMP here (the dev extras' llama.cpp build needs one)
        assert "disagrees" not in timed["plain_c"]["skipped"], timed["plain_c"]
        pytest.skip(timed["plain_c"]["skipped"])
    assert _positive(timed["plain_c"]["ms_per_token"]), timed["plain_c"]


@pytest.mark.parametrize("count, last_in", [(1, "a"), (2, "b"), (3, "a"), (4, "b")])
def test_plain_matvec_chain_computes_what_numpy_does(count, last_in):
    from benchmarks.generate import _plain_matvec

    rng = np.random.default_rng(count)
    shapes = ((32, 96), (32, 48), (48, 32), (32, 100))[:count]
    mats = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    run = _plain_matvec(mats, threads=2)
    if not callable(run):  # no C compiler with OpenMP here: the reason (a wrong result is a failure)
        assert "disagrees" not in run, run
        pytest.skip(run)
    assert run(3) > 0
    rows, args, x, a, b = run._keep
    want = x
    for w in mats:  # each next matrix reads the first rows of the last output (the query third of q, k, v)
        want = want[: w.shape[0]] @ w
    got = {"a": a, "b": b}[last_in][: want.size]  # the C loop alternates between two buffers
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_plain_matvec_without_a_compiler_says_so(monkeypatch, tmp_path):
    from benchmarks.generate import _plain_matvec

    monkeypatch.setenv("CC", "no-such-cc")
    assert _plain_matvec([np.ones((4, 4), np.float32)], threads=1) == "no C compiler: CC='no-such-cc' not found"
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _plain_matvec([np.ones((4, 4), np.float32)], threads=1) == "no C compiler (cc or gcc) on PATH"


def test_plain_matvec_names_the_compilers_error(monkeypatch, tmp_path):
    from benchmarks.generate import _plain_matvec

    fake = tmp_path / "fakecc"
    fake.write_text(
        "#!/bin/sh\necho 'fakecc: warning: first' >&2; echo 'matvec.c:1: error: no such thing' >&2; exit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    why = _plain_matvec([np.ones((4, 4), np.float32)], threads=1)
    assert why == f"{fake} could not build matvec.c: matvec.c:1: error: no such thing", why


def test_interleaved_runs_engines_in_turn_and_keeps_every_round():
    from benchmarks.common import interleaved

    order, speeds = [], {"a": iter([30.0, 10.0, 20.0]), "b": iter([5.0, 7.0, 6.0])}

    def engine(key):
        def run():
            order.append(key)
            return {"tokens_per_sec": next(speeds[key])}, key

        return run

    per_round: dict = {}
    timed = interleaved({"a": engine("a"), "b": engine("b")}, rounds=3, per_round=per_round)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert per_round == {"a": [30.0, 10.0, 20.0], "b": [5.0, 7.0, 6.0]}
    assert timed["a"][0]["tokens_per_sec"] == 20.0 and timed["b"][0]["tokens_per_sec"] == 6.0  # the medians


def test_a_partial_llama_server_run_replaces_only_what_it_reran():
    from benchmarks.serve import _kept_and_rerun

    earlier = {"quickstart": {"fp32": "q-fp32", "q8": "q-q8"}, "gpt2-124m-shape": {"fp32": "old", "q8": "b-q8"}}
    merged = _kept_and_rerun(earlier, {"gpt2-124m-shape": {"fp32": "new"}})
    assert merged == {"quickstart": {"fp32": "q-fp32", "q8": "q-q8"}, "gpt2-124m-shape": {"fp32": "new", "q8": "b-q8"}}
    assert earlier["gpt2-124m-shape"]["fp32"] == "old"  # (the report read in is not changed in place)
    assert _kept_and_rerun({}, {"quickstart": {"q8": "first"}}) == {"quickstart": {"q8": "first"}}


def test_bench_serve_llama_server_flags_default_to_every_model_and_precision(monkeypatch, tmp_path):
    import benchmarks as bench
    from benchmarks.__main__ import main
    from benchmarks.serve import LLAMA_PRECISIONS, MODELS

    calls = []
    monkeypatch.setattr(bench, "bench_serve_llama", lambda **kw: calls.append(kw), raising=False)
    for extra in ([], ["--models", "quickstart,quickstart", "--precisions", "q8", "--repetitions", "5"]):
        with pytest.raises(SystemExit) as exit:
            main(["serve", "--llama-server", "--llama-cpp", str(tmp_path), *extra])
        assert exit.value.code == 0
    assert calls[0]["models"] == MODELS and calls[0]["precisions"] == tuple(p for p, _, _ in LLAMA_PRECISIONS)
    assert calls[0]["repetitions"] == 3 and calls[0]["llama_cpp"] == str(tmp_path)
    assert calls[1]["models"] == ("quickstart",) and calls[1]["precisions"] == ("q8",) and calls[1]["repetitions"] == 5


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--models", "gpt2", "--models 'gpt2': choose from quickstart, gpt2-124m-shape"),
        ("--precisions", "fp16", "--precisions 'fp16': choose from fp32, q8"),
        ("--precisions", ",", "--precisions ',': choose from fp32, q8"),
        ("--repetitions", "0", "--repetitions 0: give at least 1"),
    ],
)
def test_bench_serve_llama_server_refuses_an_unknown_model_precision_or_count(capsys, tmp_path, flag, value, message):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", "--llama-server", "--llama-cpp", str(tmp_path), flag, value])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_bench_step(tmp_path):
    """Three ways of one training step, each in a fresh process: every way measured, kept memory where asked."""
    from benchmarks.step import WAYS, bench_step

    tiny = ["model.n_layer=1", "model.n_embd=32", "train.batch_size=2", "train.block_size=16"]
    out = tmp_path / "bench_step.json"
    report = json.loads(bench_step(tiny, steps=2, rounds=1, output=str(out)).read_text())
    assert report["shape"] == {"n_layer": 1, "n_embd": 32, "vocab_size": 4096, "batch_size": 2, "block_size": 16}
    assert set(report["summary"]) == set(WAYS) and report["summary"]["gelu_new"]["vs_gelu_new"] == 1.0
    assert all(len(ms) == 1 and _positive(ms[0]) for ms in report["step_ms"].values())
    assert report["memory_kept"] == {"gelu_new": False, "fused gelu": False, "fused gelu, kept memory": True}
