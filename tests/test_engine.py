"""The continuous-batching engine against references: transformers generate, itself alone, every graph alike.

Each engine test runs on both runners: the slot runner (the fused graph, rows in place) and the padded runner
(the graph as exported, rows left-padded into one batch: what lean and traced graphs and CUDA run), and on the
slot runner with a second session for a row alone (what ``penwright serve`` gives a small model)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from penwright.core.errors import InvalidValue, PenwrightError
from penwright.inference.engine import Engine, Request
from penwright.inference.sampling import GREEDY, SamplingConfig

PROMPTS = ["The quick brown fox", "In the beginning", "", "Numbers like 12,345 and 2026 appear too, with"]


@pytest.fixture(scope="module", params=["slots", "padded", "lone"])
def engine(onnx_tiny, request) -> Engine:
    """Each runner; "lone": the slot runner on one thread with a two-thread session for a row alone (serve's
    small-model default), so every test here compares it too: alone there, beside others on the other."""
    if request.param == "lone":
        return Engine.load(onnx_tiny, slots=16, threads=1, lone_threads=2)
    return Engine.load(onnx_tiny, slots=16, padded=request.param == "padded")


@pytest.fixture(scope="module")
def slot_engine(onnx_tiny) -> Engine:
    return Engine.load(onnx_tiny, slots=16)


def run(engine: Engine, requests: list[Request]) -> list[Request]:
    for r in requests:
        engine.submit(r)
    while engine.step() or not engine.waiting.empty():
        pass
    return requests


def greedy(engine, prompt, n, **kw) -> Request:
    return Request(engine.encode(prompt), n, SamplingConfig(do_sample=False), stop_at_eos=False, **kw)


def test_greedy_tokens_equal_transformers_generate_alone_and_in_a_batch(engine, tiny_gpt2):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    refs = []
    for prompt in PROMPTS:
        ids = torch.tensor([engine.encode(prompt)])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=20,
                min_new_tokens=20,
                eos_token_id=None,
                pad_token_id=engine.eos,
            )
        refs.append(out[0, ids.shape[1] :].tolist())
    alone = [run(engine, [greedy(engine, p, 20)])[0].tokens for p in PROMPTS]
    together = [r.tokens for r in run(engine, [greedy(engine, p, 20) for p in PROMPTS])]
    assert alone == refs
    assert together == refs


def test_a_seeded_request_gives_the_same_text_alone_or_beside_15_others(engine):
    def target():
        return Request(
            engine.encode("The quick brown fox"),
            40,
            SamplingConfig(temperature=1.0, top_k=50),
            seed=1234,
            stop_at_eos=False,
        )

    alone = run(engine, [target()])[0]
    # half of the others sample with the target's settings (they share its batched sampling call), half not
    settings = [SamplingConfig(temperature=1.0, top_k=50), SamplingConfig(temperature=0.7, top_p=0.9)]
    others = [
        Request(engine.encode(PROMPTS[i % 4]), 5 + 2 * (i % 8), settings[i % 2], seed=i, stop_at_eos=False)
        for i in range(15)
    ]
    for r in others[:7]:  # some rows are mid-sequence when the target joins, the rest join with it
        engine.submit(r)
    engine.step()
    engine.step()
    engine.step()
    beside = run(engine, [*others[7:], target()])[-1]
    assert len(alone.tokens) == 40
    assert beside.tokens == alone.tokens
    assert engine.running == 0


def test_rows_leave_when_done_and_free_their_slot_at_once(engine):
    short, long = greedy(engine, "The", 3), greedy(engine, "The quick", 30)
    engine.submit(short)
    engine.submit(long)
    engine.step()
    assert engine.running == 2
    engine.step()
    engine.step()
    assert short.finish_reason == "length" and len(short.tokens) == 3
    assert engine.running == 1 and long.finish_reason is None  # the long row runs on alone
    late = greedy(engine, "In", 4)
    engine.submit(late)
    engine.step()
    assert engine.rows[0] is not None and engine.rows[0].request is late  # the freed lowest slot is reused
    if engine.runner.padded:  # the batch holds the running rows only: the one that left is out of it
        assert [r.request for r in engine.runner.order] == [long, late]
    run(engine, [])
    assert len(long.tokens) == 30 and len(late.tokens) == 4


def test_joining_and_leaving_copy_nothing_and_leave_other_rows_caches_alone(slot_engine):
    engine = slot_engine
    pointers = [c.ctypes.data for c in engine.runner.cache]
    first = greedy(engine, "The quick brown fox", 30)
    engine.submit(first)
    for _ in range(5):
        engine.step()
    slot = next(r.slot for r in engine.rows if r is not None)
    length = engine.rows[slot].length
    before = [c[slot, :, :length].copy() for c in engine.runner.cache]
    other = greedy(engine, "Numbers like 12,345", 2)
    engine.submit(other)
    engine.step()
    engine.step()
    engine.step()  # joins, runs, leaves
    assert other.finish_reason == "length"
    for c, b in zip(engine.runner.cache, before):
        assert np.array_equal(c[slot, :, :length], b)  # written once, never moved or re-padded
    assert [c.ctypes.data for c in engine.runner.cache] == pointers
    run(engine, [])


def test_stop_strings_eos_min_tokens_and_cancel(engine):
    free = run(engine, [greedy(engine, "The quick brown fox", 20)])[0]
    text = free.text
    assert len(text) > 4
    stop = text[2:4]
    stopped = run(engine, [greedy(engine, "The quick brown fox", 20, stop=(stop,))])[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]

    # min_tokens forbids EOS before n: with EOS forced most likely, a row still runs min_tokens long
    engine_eos = engine.eos
    forced = Request([engine_eos], 6, SamplingConfig(do_sample=False), min_tokens=6)
    run(engine, [forced])
    assert len(forced.tokens) == 6 and engine_eos not in forced.tokens

    cancelled = greedy(engine, "The", 30)
    engine.submit(cancelled)
    engine.step()
    cancelled.cancel()
    engine.step()
    assert cancelled.finish_reason == "cancelled" and engine.running == 0


def test_a_request_past_its_deadline_is_a_timeout_even_once_cancelled(engine):
    """A server cancels what it stopped waiting for: a request whose deadline passed first ends ``timeout``,
    running or still waiting (the metrics count it by that reason)."""
    running, waiting = greedy(engine, "The", 30), greedy(engine, "The", 30)
    engine.submit(running)
    engine.step()
    assert running.finish_reason is None
    running.deadline = waiting.deadline = time.monotonic() - 1
    engine.submit(waiting)
    running.cancel()
    waiting.cancel()
    engine.step()
    assert (running.finish_reason, waiting.finish_reason) == ("timeout", "timeout") and engine.running == 0


def test_streamed_pieces_add_up_to_the_text(engine):
    pieces, reasons = [], []
    r = Request(
        engine.encode("The quick"),
        25,
        SamplingConfig(temperature=1.0),
        seed=3,
        stop_at_eos=False,
        emit=lambda text, reason: (pieces.append(text), reasons.append(reason)),
    )
    run(engine, [r])
    assert "".join(pieces) == r.text
    assert reasons[-1] == "length" and all(x is None for x in reasons[:-1])


def test_the_context_and_bad_values_are_refused_before_queueing(engine):
    with pytest.raises(InvalidValue, match="exceeds the context of 64"):
        engine.submit(greedy(engine, "The quick brown fox", 64))
    with pytest.raises(InvalidValue, match="max_tokens=0"):
        engine.submit(greedy(engine, "The", 0))
    assert engine.waiting.empty()


def test_a_graph_the_engine_cannot_read_gets_one_clear_line(tmp_path, onnx_tiny):
    import shutil

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_tiny, folder)
    (folder / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(PenwrightError, match="cannot be read as an ONNX graph"):
        Engine.load(folder)
    with pytest.raises(PenwrightError, match="not found"):
        Engine.load(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def every_graph(onnx_tiny, tiny_gpt2, tmp_path_factory) -> dict:
    """The tiny model's folder with each graph the export writes: fused (model.onnx), lean, traced, q8."""
    import shutil

    from transformers import GPT2LMHeadModel

    from penwright.export.graph import build_graph
    from penwright.export.quantize import quantize
    from penwright.export.save import save_graph
    from penwright.export.trace import export_graph

    folder = tmp_path_factory.mktemp("graphs") / "onnx"
    shutil.copytree(onnx_tiny, folder)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    save_graph(build_graph(model, "lean"), folder / "model.lean.onnx")
    export_graph(model, folder / "model.traced.onnx", 17)
    quantize(folder / "model.onnx", "q8")
    return folder


def test_every_graph_gives_the_same_text_for_the_same_seed(every_graph, tiny_gpt2):
    from transformers import GPT2LMHeadModel

    from penwright.inference.runner import PaddedRunner, SlotRunner

    engines = {
        "fused": Engine.load(every_graph, slots=4),
        "fused-padded": Engine.load(every_graph, slots=4, padded=True),
        "lean": Engine.load(every_graph, slots=4, graph="model.lean.onnx"),
        "traced": Engine.load(every_graph, slots=4, graph="model.traced.onnx"),
    }
    assert isinstance(engines["fused"].runner, SlotRunner)
    assert all(isinstance(e.runner, PaddedRunner) for k, e in engines.items() if k != "fused")
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    refs = []
    for prompt in PROMPTS:
        ids = torch.tensor([engines["fused"].encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
        refs.append(out[0, ids.shape[1] :].tolist())
    for name, e in engines.items():  # greedy: transformers' tokens on every graph
        assert (
            e.generate_ids([e.encode(p) for p in PROMPTS], 16, stop_at_eos=False, sampling=GREEDY).tolist() == refs
        ), name
    sampled = {
        name: e.generate(PROMPTS, 24, seed=7, min_new_tokens=24, sampling=SamplingConfig(temperature=0.9, top_k=40))
        for name, e in engines.items()
    }
    assert len(set(map(tuple, sampled.values()))) == 1, sampled  # the same seed: the same text on every fp32 graph
    q8 = Engine.load(every_graph, slots=4, graph="model.q8.onnx")  # another precision: it runs, on the slot runner
    assert isinstance(q8.runner, SlotRunner) and len(q8.generate(PROMPTS, 8, seed=7)) == 4


def test_the_generate_stage_runs_every_graph_on_the_engine(every_graph, repo):
    from penwright.core.config import compose
    from penwright.generate.stage import load

    def loaded(*overrides):
        return load(compose([f"generate.model_dir={every_graph}", *overrides], config_dir=repo / "conf").generate)

    fused = loaded()
    for graph in ("model.lean.onnx", "model.traced.onnx"):
        other = loaded(f"generate.graph={graph}")
        assert isinstance(other, Engine) and other.runner.padded
        assert other.generate(["The"], 8, sampling=GREEDY) == fused.generate(["The"], 8, sampling=GREEDY)


def test_a_bad_seed_is_refused_at_submit(engine):
    with pytest.raises(InvalidValue, match="seed=-1"):
        engine.submit(greedy(engine, "The", 3, seed=-1))
    assert engine.waiting.empty()


def _rows(lengths, slots=None, scored=()):
    from types import SimpleNamespace

    return [
        SimpleNamespace(slot=s, request=SimpleNamespace(prompt_ids=[0] * n, score_prompt=i in scored))
        for i, (n, s) in enumerate(zip(lengths, slots or range(len(lengths))))
    ]


def test_prefill_runs_split_where_padding_costs_more_than_a_run(slot_engine):
    from penwright.inference.runner import PREFILL_TOKENS, RUN_COST

    batches = slot_engine.runner.batches

    def widths(rows):
        return [[len(r.request.prompt_ids) for r in run] for run in batches(rows)]

    assert widths(_rows([4] * 30)) == [[4] * 30]  # like lengths: one run
    assert widths(_rows([3, 4, 4, 5])) == [[3, 4, 4, 5]]  # a little padding is cheaper than a second run
    short, long = [2] * 20, [2 + RUN_COST] * 4  # joined, the 20 short ones would pad 20 * RUN_COST tokens
    assert widths(_rows(short + long)) == [short, long]
    assert widths(_rows([4, 4, 4], slots=[0, 1, 5])) == [[4, 4], [4]]  # consecutive slots only
    assert widths(_rows([4, 4, 4], scored={1})) == [[4], [4], [4]]  # a scored prompt runs alone
    n = PREFILL_TOKENS // 64 + 3
    assert all(len(run) * 64 <= PREFILL_TOKENS for run in batches(_rows([64] * n)))
    assert widths(_rows([PREFILL_TOKENS + 1])) == [[PREFILL_TOKENS + 1]]  # a prompt past the limit runs alone


def test_a_burst_of_unlike_prompts_prefills_in_several_runs_and_gives_each_its_alone_tokens(engine):
    from penwright.inference.runner import RUN_COST

    short = ["The"] * 6
    text = "In the beginning"  # long enough that padding the six short prompts to it costs more than a run
    while len(engine.encode(text)) < len(engine.encode("The")) + RUN_COST // 6 + 2:
        text += " was the word"
    long = [text] * 2
    prompts = long[:1] + short + long[1:]  # arrival order mixes them; the engine sorts them into its slots
    alone = [run(engine, [greedy(engine, p, 6)])[0].tokens for p in prompts]
    runs = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda rows: runs.append(len(rows)) or prefill(rows)
    try:
        together = run(engine, [greedy(engine, p, 6) for p in prompts])
    finally:
        del engine.runner.prefill
    assert sorted(runs) == [2, 6]  # the short prompts apart from the long ones
    assert [r.tokens for r in together] == alone


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or not Path("/proc/self/task").is_dir(), reason="Linux only")
def test_a_row_alone_runs_on_the_lone_session_whose_worker_alone_has_idle_priority(onnx_tiny):
    """``lone_threads``: the runs of one row go to the second session, those of several to the first; the one
    thread onnxruntime starts for the two-thread session is at SCHED_IDLE, the caller's as it was."""

    def threads() -> set[int]:
        return {int(t) for t in os.listdir("/proc/self/task")}

    before = threads()
    engine = Engine.load(onnx_tiny, slots=4, threads=1, lone_threads=2)
    pool = threads() - before
    assert len(pool) == 1  # the one-thread session starts none; the two-thread one, one worker beside the caller
    assert {os.sched_getscheduler(t) for t in pool} == {os.SCHED_IDLE}
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER  # the caller's, which runs steps
    runs = {"main": 0, "lone": 0}

    class Counted:  # the runner calls a session that is not onnxruntime's own through its run_with_iobinding
        def __init__(self, session, name):
            self.session, self.name = session, name

        def __getattr__(self, attr):
            return getattr(self.session, attr)

        def run_with_iobinding(self, binding):
            runs[self.name] += 1
            return self.session.run_with_iobinding(binding)

    engine.runner.session = Counted(engine.runner.session, "main")
    engine.runner.lone_session = Counted(engine.runner.lone_session, "lone")
    run(engine, [greedy(engine, "The", 5)])
    assert runs == {"main": 0, "lone": 5}  # the prompt's run (the first token), then four steps alone
    run(engine, [greedy(engine, "The", 5), greedy(engine, "A", 5)])
    assert runs == {"main": 5, "lone": 5}  # both prompts in one run, then four steps of two rows
