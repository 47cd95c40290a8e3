"""``python -m benchmarks generate``: measure the runtime side by side with its baselines, write benchmarks/results/bench_generate.json.

generate (see ``bench_generate``): this runtime against ``transformers`` generate and against itself
without a cache; then against llama.cpp (its own ``llama-bench`` and ``llama-batched-bench``, built by
``scripts/build_llama_cpp.sh``) on the same weights exported as GGUF, at fp32, 8 and 4 bits, with each
quantization's top-1 agreement with fp32 on validation windows.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    BENCH_DIR,
    ROUNDS,
    SHAPE_124M,
    fresh_dir,
    interleaved,
    log,
    random_gpt2,
    require_export,
    run_child,
    save_fused,
    write_report,
)
from penwright.core.errors import PenwrightError
from penwright.export.quantize import QUANTIZED
from penwright.export.save import GRAPH

TRACED = "model.traced.onnx"  # transformers' module traced (the export stage's export.graph=transformers)
LEAN = "model.lean.onnx"  # penwright's graph in standard ONNX ops (export.graph=lean)
INT8 = QUANTIZED["int8"]  # dynamic int8 (export.quantize=[int8])


def _time_runtime(engine, prompts: list[list[int]], new_tokens: int) -> tuple[dict, np.ndarray]:
    """The engine (what generate and serve run): greedy rows of ``new_tokens`` each, submitted together."""
    from penwright.inference.engine import Request
    from penwright.inference.sampling import SamplingConfig

    greedy = SamplingConfig(do_sample=False)
    requests = [Request(list(p), new_tokens, greedy, stop_at_eos=False) for p in prompts]
    start = time.perf_counter()
    for r in requests:
        engine.submit(r)
    engine.run_until_idle()
    seconds = time.perf_counter() - start
    out = np.array([r.tokens for r in requests])
    first = min(r.first_token_at for r in requests) - min(r.queued_at for r in requests)
    return {
        "tokens_per_sec": round(out.size / seconds, 1),
        "first_token_ms": round(first * 1000, 1),
        "seconds": round(seconds, 3),
    }, out


def no_cache_ids(onnx_dir: Path, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """The baseline a KV cache is measured against: greedy decoding that re-feeds the whole left-padded sequence
    at every step (no past), on the exported graph as it is."""
    from penwright.export.parity import graph_runner
    from penwright.inference.runner import position_ids_for

    runner = graph_runner(onnx_dir, GRAPH)
    out = np.empty((len(ids), new_tokens), dtype=np.int64)
    for t in range(new_tokens):
        logits, _ = runner.forward(ids, mask, position_ids_for(mask, ids.shape[1]), None)
        out[:, t] = logits[:, -1].argmax(-1)
        ids = np.concatenate([ids, out[:, t : t + 1]], axis=1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), dtype=np.int64)], axis=1)
    return out


def _time_no_cache(onnx_dir: Path, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> dict:
    start = time.perf_counter()
    out = no_cache_ids(onnx_dir, ids, mask, new_tokens)
    seconds = time.perf_counter() - start
    return {"tokens_per_sec": round(out.size / seconds, 1), "seconds": round(seconds, 3)}


def _time_torch(model, ids, mask, new_tokens: int, eos: int) -> dict:
    import torch

    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=eos, use_cache=True)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=1, **kwargs
        )
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            **kwargs,
        )[:, ids.shape[1] :].numpy()
        seconds = time.perf_counter() - start
    return {
        "tokens_per_sec": round(out.size / seconds, 1),
        "first_token_ms": round(first * 1000, 1),
        "seconds": round(seconds, 3),
    }, out


def _variants(model, onnx_dir: Path) -> None:
    """The lean, traced (transformers' module, opset 17) and int8 graphs beside the exported one in ``onnx_dir``."""
    from penwright.export.graph import build_graph
    from penwright.export.quantize import quantize
    from penwright.export.save import save_graph
    from penwright.export.trace import export_graph

    save_graph(build_graph(model, "lean"), onnx_dir / LEAN)
    export_graph(model, onnx_dir / TRACED, 17)
    if not (onnx_dir / INT8).is_file():
        quantize(onnx_dir / GRAPH, "int8")


def _random_124m(workdir: Path, tokenizer_dir: Path, shape: tuple[int, int, int] = SHAPE_124M) -> Path:
    """A GPT-2-124M-shaped model (12 layers, 768 wide, vocab 50257; ``shape`` for another) with random weights,
    exported as the export stage does (penwright's fused graph), plus its lean, traced and int8 variants for
    comparison. Its Hugging Face folder."""
    from transformers import AutoTokenizer

    model = random_gpt2(shape)
    hf_dir, onnx_dir = workdir / "gpt2-124m-random", workdir / "gpt2-124m-random-onnx"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # ids stay below 50257: any GPT-2-style tokenizer serves
    model.config.bos_token_id = model.config.eos_token_id = tok.eos_token_id  # its end of text is the tokenizer's
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    save_fused(model, tok, onnx_dir)
    _variants(model, onnx_dir)
    return hf_dir


def _quickstart_variants(onnx_dir: Path, hf_dir: Path, workdir: Path) -> Path:
    """A copy of the quickstart's ONNX folder with the lean, traced and int8 graphs beside the exported one."""
    from transformers import GPT2LMHeadModel

    copy = workdir / "quickstart-onnx"
    shutil.copytree(onnx_dir, copy)
    _variants(GPT2LMHeadModel.from_pretrained(hf_dir).eval(), copy)
    return copy


def _weight_matrices(model) -> list[np.ndarray]:
    """The fp32 matrices one batch-1 decoding step reads whole, in the order it reads them: per layer attention
    in, attention out, MLP in, MLP out ([in, out] each); then the output projection as [embd, vocab], once
    (the embeddings give one row each, so they are left out)."""
    matrices = [
        p.detach().float().numpy()
        for n, p in model.named_parameters()
        if p.dim() == 2 and not n.endswith(("wte.weight", "wpe.weight")) and not n.startswith("lm_head")
    ]
    matrices.append(np.ascontiguousarray(model.lm_head.weight.detach().float().numpy().T))
    return matrices


def _weights_floor(model, rounds: int = 5) -> dict:
    """The least time this machine takes for the matrix-vector products of one batch-1 decoding step
    in fp32, and nothing else: ``x @ W`` over every weight matrix of the model in turn (attention,
    MLP, the output projection read whole; the embeddings give one row each, so they are left out),
    best of ``rounds``, the faster of numpy and PyTorch. These read every weight once (~4 bytes per
    parameter), so memory bandwidth bounds them; no fp32 engine decodes a token at batch 1 faster."""
    import torch

    arrays = _weight_matrices(model)
    mats = [torch.from_numpy(a) for a in arrays]
    inputs = [np.ones((1, a.shape[0]), np.float32) for a in arrays]
    size = sum(a.nbytes for a in arrays)

    def numpy_chain():
        for x, w in zip(inputs, arrays):
            x @ w

    def torch_chain():
        with torch.no_grad():
            for x, w in zip(inputs, mats):
                torch.from_numpy(x) @ w

    best = {}
    for name, chain in (("numpy", numpy_chain), ("torch", torch_chain)):
        chain()  # warm
        best[name] = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            chain()
            best[name] = min(best[name], time.perf_counter() - start)
    fastest = min(best.values())
    return {
        "weights_mb": round(size / 1e6, 1),
        "matrices": len(arrays),
        "read_gb_per_s": round(size / fastest / 1e9, 1),
        "ms_per_token": round(fastest * 1000, 2),
        "ms_per_token_numpy": round(best["numpy"] * 1000, 2),
        "ms_per_token_torch": round(best["torch"] * 1000, 2),
    }


def _onnxruntime_matmuls(model, rounds: int = 7, steps: int = 200, threads: int | None = None) -> dict:
    """onnxruntime's share of a batch-1 fp32 step that no graph change removes: the model's own weight
    matrices (per layer: attention in, attention out, MLP in, MLP out; then the output projection) as one
    chain of MatMuls (a Slice keeps the query's third of the attention input), nothing else, in a session of its
    own each round. In the same rounds, right after it, the same chain through a plain C matrix-vector loop
    (``plain_c``, see ``_plain_matvec``): what a kernel made for these shapes does with the same bytes. Both
    run ``threads`` threads (default: one per core). Milliseconds a step, median of ``rounds`` runs of
    ``steps`` steps each."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    e = model.config.n_embd
    mats = _weight_matrices(model)
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("lo", [0]), ("hi", [e]), ("ax", [2]))]
    nodes, x = [], "x"
    for j, w in enumerate(mats):
        inits.append(numpy_helper.from_array(w, f"w{j}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{j}"], [f"y{j}"]))
        x = f"y{j}"
        if w.shape[1] == 3 * e:
            nodes.append(helper.make_node("Slice", [x, "lo", "hi", "ax"], [f"q{j}"]))
            x = f"q{j}"
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, e])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    serialized, feed = onnx_model.SerializeToString(), {"x": np.ones((1, 1, e), np.float32)}
    del onnx_model, graph, inits  # the serialized bytes are what the sessions read (124M: ~500 MB each)
    threads = threads or os.cpu_count() or 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    plain = _plain_matvec(mats, threads)

    def timed_onnxruntime():  # a session of its own each round: its idle threads spin for a while after a run,
        # which was measured to slow the C loop run right after it by 40-60%
        session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        for _ in range(min(steps, 20)):
            session.run(None, feed)
        start = time.perf_counter()
        for _ in range(steps):
            session.run(None, feed)
        return (time.perf_counter() - start) / steps

    times: dict[str, list[float]] = {"onnxruntime": [], "plain_c": []}
    for r in range(rounds + 1):
        spent = {"onnxruntime": timed_onnxruntime()}
        if callable(plain):
            spent["plain_c"] = plain(steps)
        if r:  # the first warms up
            for k, v in spent.items():
                times[k].append(v)
    result = {
        "weights_mb": round(sum(w.nbytes for w in mats) / 1e6, 2),
        "matmuls": len(mats),
        "ms_per_token": round(statistics.median(times["onnxruntime"]) * 1000, 3),
    }
    if callable(plain):
        ms = statistics.median(times["plain_c"]) * 1000
        result["plain_c"] = {
            "ms_per_token": round(ms, 3),
            "onnxruntime_over_plain_c": round(result["ms_per_token"] / ms, 2),
            "threads": threads,
            "compiler": plain.compiler,
            "meaning": "the same matrices through a plain C matrix-vector loop (benchmarks/matvec.c), same threads",
        }
    else:
        result["plain_c"] = {"skipped": plain}
    return result


def _plain_matvec(mats: list[np.ndarray], threads: int):
    """``steps -> seconds a step`` running ``mats`` (each [in, out]) through benchmarks/matvec.c on ``threads``
    threads, compiled here with the system's C compiler ($CC, else cc or gcc; -O3
    -march=native -fopenmp); its output is checked against numpy's first. Where it cannot be built or
    disagrees with numpy, a string that says why instead (the benchmark reports it and goes on)."""
    import ctypes
    import shlex
    import tempfile

    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0] or shutil.which(cc[0]) is None:
        return (
            f"no C compiler: CC={os.environ['CC']!r} not found"
            if os.environ.get("CC")
            else "no C compiler (cc or gcc) on PATH"
        )
    source = Path(__file__).with_name("matvec.c")
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = Path(tmp) / "libmatvec.so"
        cmd = [*cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(lib_path)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{shlex.join(cc)} could not build {source.name}: {err}"
        if done.returncode:
            lines = done.stderr.strip().splitlines() or ["(no message)"]
            why = next((line for line in lines if "error" in line), lines[0])
            return f"{shlex.join(cc)} could not build {source.name}: {why.strip()}"
        lib = ctypes.CDLL(str(lib_path))  # loaded: the file may go
    lib.chain.restype = ctypes.c_double
    rows = [np.ascontiguousarray(w.T) for w in mats]  # [out, in]: one contiguous row per output
    floats = ctypes.POINTER(ctypes.c_float)
    count = len(rows)
    args = (
        count,
        (floats * count)(*[r.ctypes.data_as(floats) for r in rows]),
        (ctypes.c_int * count)(*[r.shape[1] for r in rows]),
        (ctypes.c_int * count)(*[r.shape[0] for r in rows]),
    )
    width = max(max(r.shape) for r in rows)
    a, b = np.zeros(width, np.float32), np.zeros(width, np.float32)
    x = np.random.default_rng(0).standard_normal(mats[0].shape[0]).astype(np.float32)
    buffers = [v.ctypes.data_as(floats) for v in (x, a, b)]

    def run(steps: int) -> float:
        return lib.chain(*args, *buffers, steps, threads)

    run(1)
    want = x
    for w in mats:
        want = (want[: w.shape[0]] @ w).astype(np.float32)
    got = (a if count % 2 else b)[: want.size]
    if not np.allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max())):
        return (
            f"{source.name} built by {shlex.join(cc)} disagrees with numpy (max error {np.abs(got - want).max():.3g})"
        )
    run._keep = (rows, args, x, a, b)  # the buffers the C side reads
    run.compiler = shlex.join(cc)
    return run


# -- against llama.cpp ---------------------------------------------------------------------------------

LLAMA_CPP = Path(".llama.cpp") / "bin"  # where scripts/build_llama_cpp.sh puts llama.cpp's tools
LLAMA_TOOLS = ("llama-bench", "llama-batched-bench")
# (precision, penwright's graph, llama.cpp's GGUF type): the graphs export.quantize writes (q8, q4), the GGUF types
# with the same blocks
PRECISIONS = (("fp32", GRAPH, "f32"), ("8-bit", QUANTIZED["q8"], "q8_0"), ("4-bit", QUANTIZED["q4"], "q4_0"))


def llama_tools(path: str | Path) -> dict[str, Path]:
    """llama.cpp's benchmark binaries in ``path``, or a PenwrightError that says how to get them."""
    tools = {t: Path(path) / t for t in LLAMA_TOOLS}
    missing = [t for t, p in tools.items() if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        raise PenwrightError(
            f"{path}: llama.cpp's {', '.join(missing)} not found. Build them with "
            "`scripts/build_llama_cpp.sh` (about 10 min on 2 cores), point --llama-cpp at a llama.cpp "
            "build's bin/ folder, or leave llama.cpp out with --without-llama-cpp"
        )
    return tools


def _run_tool(args: list) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise PenwrightError(f"{Path(args[0]).name} failed (exit {done.returncode}) on {args[2]}: {tail}")
    return done.stdout


def _llama_tg(tools: dict, gguf: Path, n: int, threads: int, reps: int = 4) -> dict:
    """llama-bench's decoding test: ``n`` tokens one at a time from an empty context, ``reps`` times in one
    process; the median of all but the first. The first repetition runs cold (1200-1700 against ~2650
    tokens/s warm on the quickstart model, measured): penwright's engine is timed warm, so is llama.cpp."""
    if reps < 2:
        raise ValueError(f"reps={reps}: at least 2 (the first, cold, is dropped)")
    rows = json.loads(
        _run_tool([tools["llama-bench"], "-m", gguf, "-p", 0, "-n", n, "-t", threads, "-r", reps, "-o", "json"])
    )
    runs = [round(float(x), 1) for x in rows[0]["samples_ts"]]
    return {"tokens_per_sec": round(statistics.median(runs[1:]), 1), "first_run": runs[0], "warm_runs": runs[1:]}


def _llama_batched(
    tools: dict, gguf: Path, prompt: int, n: int, batches: list[int], threads: int, reps: int = 3, tries: int = 3
) -> dict:
    """llama-batched-bench: ``batch`` sequences of ``prompt`` tokens decoding ``n`` tokens together: decode
    tokens/s, each batch size ``reps`` times in one process, the median of all but the first (which runs cold:
    5173 against ~6280 tokens/s at batch 8 on the quickstart model, measured). The tool sometimes exits 0
    with some or all of its result rows missing (seen here in 5 runs of 60); such a run is repeated,
    up to ``tries`` times."""
    if reps < 2:
        raise ValueError(f"reps={reps}: at least 2 (the first, cold, is dropped)")
    args = [
        tools["llama-batched-bench"],
        "-m",
        gguf,
        "-c",
        max(batches) * (prompt + n),
        "-b",
        2048,
        "-ub",
        512,
        "-npp",
        prompt,
        "-ntg",
        n,
        "-npl",
        ",".join(str(b) for b in batches for _ in range(reps)),
        "-t",
        threads,
        "--output-format",
        "jsonl",
    ]
    for _ in range(tries):
        speeds: dict[int, list[float]] = {}
        for line in _run_tool(args).splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                speeds.setdefault(int(row["pl"]), []).append(float(row["speed_tg"]))
        if all(len(speeds.get(b, [])) == reps for b in batches):
            return {b: round(statistics.median(speeds[b][1:]), 1) for b in batches}
    got = {b: len(speeds.get(b, [])) for b in batches}
    raise PenwrightError(
        f"llama-batched-bench printed incomplete results {tries} times (runs per batch size: {got}, expected "
        f"{reps} each) on {gguf}; rerun the benchmark"
    )


PROMPT = "And it came to pass"
RUNTIME_CASES = {  # the engine's cases beside transformers: report key -> (graph file, padded runner)
    "runtime": (GRAPH, False),  # the exported fused graph on the slot runner: what generate and serve run
    "runtime_padded": (GRAPH, True),  # the same graph on the padded runner: the path CUDA takes, here on the CPU
    "runtime_lean_graph": (LEAN, False),  # standard ONNX operators (export.graph=lean)
    "runtime_traced_graph": (TRACED, False),  # transformers' module traced (export.graph=transformers)
    "runtime_int8": (INT8, False),  # dynamic int8 (export.quantize=[int8]): another precision, other tokens
}


def _runtime_case(name: str, onnx_dir: Path, ref, batch: int, new_tokens: int, rounds: int) -> dict:
    """Every runtime case and transformers generate, greedy from the same prompt, interleaved; the no-cache
    baseline once (it is slow)."""
    from penwright.inference.engine import Engine

    loaded = {
        key: Engine.load(onnx_dir, slots=batch, graph=graph, padded=padded)
        for key, (graph, padded) in RUNTIME_CASES.items()
        if (onnx_dir / graph).is_file()
    }
    prompt = loaded["runtime"].encode(PROMPT)
    n = min(new_tokens, loaded["runtime"].context - len(prompt))
    ids = np.array([prompt] * batch)
    mask = np.ones_like(ids)
    engines = {key: (lambda e=e: _time_runtime(e, ids.tolist(), n)) for key, e in loaded.items()}
    engines["transformers_generate"] = lambda: _time_torch(ref, ids, mask, n, loaded["runtime"].eos)
    log(f"{name} batch {batch}: {n} new tokens x {len(engines) + 1} engines, cached ones {rounds} rounds interleaved")
    timed = interleaved(engines, rounds)
    (a, a_ids), (b, b_ids) = timed["runtime"], timed["transformers_generate"]
    c = _time_no_cache(onnx_dir, ids, mask, n)
    case = {"new_tokens": n, "transformers_generate": b, "runtime_no_cache": c}
    for key in loaded:
        case[key] = timed[key][0]
    case |= {
        "runtime_over_transformers": round(a["tokens_per_sec"] / b["tokens_per_sec"], 2),
        "runtime_over_no_cache": round(a["tokens_per_sec"] / c["tokens_per_sec"], 2),
        "runtime_over_padded": round(a["tokens_per_sec"] / timed["runtime_padded"][0]["tokens_per_sec"], 2),
        "graph_over_lean_graph": round(a["tokens_per_sec"] / timed["runtime_lean_graph"][0]["tokens_per_sec"], 2),
        "graph_over_traced_graph": round(a["tokens_per_sec"] / timed["runtime_traced_graph"][0]["tokens_per_sec"], 2),
        "same_tokens_as_transformers": bool(np.array_equal(a_ids, b_ids)),
        "padded_same_tokens": bool(np.array_equal(timed["runtime_padded"][1], b_ids)),
        "lean_graph_same_tokens": bool(np.array_equal(timed["runtime_lean_graph"][1], b_ids)),
        "traced_graph_same_tokens": bool(np.array_equal(timed["runtime_traced_graph"][1], b_ids)),
        "provider": loaded["runtime"].provider,
    }
    if "runtime_int8" in loaded:  # another precision: faster, not the same tokens (see its agreement)
        q, q_ids = timed["runtime_int8"]
        case["runtime_int8_over_transformers"] = round(q["tokens_per_sec"] / b["tokens_per_sec"], 2)
        case["int8_tokens_agreeing_with_fp32"] = round(float((q_ids == a_ids).mean()), 3)
    return case


def _llama_top1(gguf: Path, ids: np.ndarray) -> np.ndarray:
    """llama.cpp's top-1 next token at every position of each window (one prefill a window)."""
    from penwright.export.gguf import load_llama

    llm = load_llama(gguf, repack=False, n_ctx=ids.shape[1] + 1, n_batch=ids.shape[1] + 1, logits_all=True, n_threads=2)
    top1 = []
    for row in ids:
        llm.reset()
        llm.eval(row.tolist())
        top1.append(np.asarray(llm.scores[: len(row)]).argmax(-1))
    return np.stack(top1)


def _child_llama_cpp(tools_dir: str, name: str, hf_dir: str, onnx_dir: str, prepared: str, block: int) -> dict:
    """Run in a subprocess (one per model): penwright starts as fresh as llama.cpp's own processes."""
    return _llama_cpp_cases(llama_tools(tools_dir), {name: (Path(hf_dir), Path(onnx_dir))}, Path(prepared), block)


def _llama_cpp_cases(
    tools: dict,
    models: dict,
    prepared: Path,
    block: int,
    new_tokens: int = 200,
    batched_tokens: int = 128,
    rounds: int = ROUNDS,
) -> dict:
    """penwright against llama.cpp on the same weights (GGUF written by export.gguf): batch 1 at each precision,
    batched decoding (fp32), and each quantization's top-1 agreement with fp32 on validation windows."""
    from transformers import GPT2LMHeadModel

    from penwright.export.gguf import export_gguf
    from penwright.export.parity import graph_logits
    from penwright.export.quantize import quantize, validation_windows
    from penwright.inference.engine import Engine

    threads = os.cpu_count() or 1
    results: dict = {
        "threads": threads,
        "new_tokens": new_tokens,
        "llama_cpp": str(tools["llama-bench"].parent),
        "measured": "batch 1: greedy decoding of new_tokens from a one-token prompt; llama.cpp: llama-bench "
        "-p 0 -n new_tokens -r 4 (decode only, its own timer; the median of repetitions 2-4, the first runs "
        "cold); penwright: its serving engine, wall time of the whole loop (sampling included; the text decoded "
        f"once at the end, as for any request nobody streams); {rounds} interleaved rounds, medians; batched: "
        "llama-batched-bench decode tokens/s (each batch size 3 times in one process, the median of the last "
        "two) against penwright's wall time",
    }
    for name, (hf_dir, onnx_dir) in models.items():
        model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
        for _, graph, _ in PRECISIONS[1:]:
            if not (onnx_dir / graph).is_file():
                quantize(onnx_dir / GRAPH, graph.split(".")[1])  # its QUANTIZED key
        ggufs = {
            g["type"]: onnx_dir / g["file"] for g in export_gguf(model, hf_dir, onnx_dir, [t for *_, t in PRECISIONS])
        }
        eos = int(model.config.eos_token_id if model.config.eos_token_id is not None else 0)
        n = min(new_tokens, model.config.n_positions - 1)
        for precision, graph, qtype in PRECISIONS:
            # penwright's serving engine (what generate and serve run), alone in this process: a second onnxruntime
            # session run right before it was measured to cost it ~15% (its worker threads keep the cores busy)
            engine = Engine.load(onnx_dir, slots=1, graph=graph)
            engines = {
                "penwright": lambda: _time_runtime(engine, [[eos]], n),
                "llama_cpp": lambda: (_llama_tg(tools, ggufs[qtype], n, threads), None),
            }
            log(f"{name} batch 1 {precision}: penwright vs llama.cpp {qtype}, {n} tokens, {rounds} rounds")
            per_round: dict = {}
            timed = interleaved(engines, rounds, per_round)
            ratios = sorted(p / q for p, q in zip(per_round["penwright"], per_round["llama_cpp"]))
            results[f"{name}/batch1/{precision}"] = {
                "penwright": timed["penwright"][0],
                f"llama_cpp_{qtype}": timed["llama_cpp"][0],
                "penwright_over_llama_cpp": round(
                    timed["penwright"][0]["tokens_per_sec"] / timed["llama_cpp"][0]["tokens_per_sec"], 2
                ),
                "tokens_per_sec_each_round": per_round,
                "ratio_each_round_min_median_max": [
                    round(r, 2) for r in (ratios[0], ratios[len(ratios) // 2], ratios[-1])
                ],
                "gguf_mb": round(ggufs[qtype].stat().st_size / 1e6, 2),
                "onnx_mb": round((onnx_dir / graph).stat().st_size / 1e6, 2),
            }
            del engine, engines
        fp32 = results[f"{name}/batch1/fp32"]
        llama_ms = 1000 / fp32["llama_cpp_f32"]["tokens_per_sec"]
        alone = _onnxruntime_matmuls(model, threads=threads)  # alone in this process, as the engine was
        fp32["onnxruntime_matmuls_alone"] = {
            **alone,
            "llama_cpp_f32_ms_per_token": round(llama_ms, 3),
            "upper_bound_over_llama_cpp": round(llama_ms / alone["ms_per_token"], 2),
            "meaning": "the ratio penwright would reach if everything in its step but these MatMuls took no time",
        }
        if "ms_per_token" in alone["plain_c"]:  # an estimate, not a measurement: the engine with C's matrix time
            engine_ms = 1000 / fp32["penwright"]["tokens_per_sec"]
            with_c = engine_ms - alone["ms_per_token"] + alone["plain_c"]["ms_per_token"]
            fp32["onnxruntime_matmuls_alone"]["estimate_with_plain_c_matmuls_over_llama_cpp"] = round(
                llama_ms / with_c, 2
            )
        if name == "quickstart":  # a trained model: how close each quantization stays to fp32
            batch = validation_windows(prepared, min(block, model.config.n_positions - 1), windows=8)
            ids_w = batch[:, :-1]
            fp32 = graph_logits(onnx_dir, GRAPH, ids_w).argmax(-1)
            llama_f32 = _llama_top1(ggufs["f32"], ids_w)
            agree = {
                "tokens": int(ids_w.size),
                "llama_cpp_f32_vs_penwright_fp32": round(float((llama_f32 == fp32).mean()), 4),
            }
            for _precision, graph, qtype in PRECISIONS[1:]:
                agree[f"penwright_{graph.split('.')[1]}"] = round(
                    float((graph_logits(onnx_dir, graph, ids_w).argmax(-1) == fp32).mean()), 4
                )
                agree[f"llama_cpp_{qtype}"] = round(float((_llama_top1(ggufs[qtype], ids_w) == fp32).mean()), 4)
            results[f"{name}/top1_agreement_with_fp32"] = agree
        else:  # batched decoding, fp32
            prompt = [eos] * 8
            for batch in (8, 32):
                engine = Engine.load(onnx_dir, slots=batch)
                engines = {
                    "penwright": lambda: _time_runtime(engine, [prompt] * batch, batched_tokens),
                    "llama_cpp": lambda: (
                        {
                            "tokens_per_sec": _llama_batched(
                                tools, ggufs["f32"], len(prompt), batched_tokens, [batch], threads
                            )[batch]
                        },
                        None,
                    ),
                }
                log(f"{name} batch {batch} fp32: {batched_tokens} tokens, 3 rounds")
                timed = interleaved(engines, 3)
                results[f"{name}/batch{batch}/fp32"] = {
                    "penwright": timed["penwright"][0],
                    "llama_cpp_f32_decode_tokens_per_sec": timed["llama_cpp"][0]["tokens_per_sec"],
                    "penwright_over_llama_cpp": round(
                        timed["penwright"][0]["tokens_per_sec"] / timed["llama_cpp"][0]["tokens_per_sec"], 2
                    ),
                }
                del engine, engines
            floor = _weights_floor(model)
            b1 = results[f"{name}/batch1/fp32"]
            ms = {k: round(1000 / b1[k]["tokens_per_sec"], 2) for k in ("penwright", "llama_cpp_f32")}
            results["memory_floor_124m_fp32"] = {
                **floor,
                "ms_per_token": ms,
                "floor_over_engine": {k: round(floor["ms_per_token"] / v, 2) for k, v in ms.items()},
            }
    return results


def bench_generate(
    output: str | None = None,
    quick_dir: str = "artifacts/model",
    quick_onnx: str = "artifacts/onnx",
    new_tokens: int = 256,
    long_tokens: int = 512,
    llama_cpp: str | None = str(LLAMA_CPP),
    prepared: str = "artifacts/prepared",
    only_llama_cpp: bool = False,
    *,
    rounds: int = ROUNDS,
    big_shape: tuple[int, int, int] = SHAPE_124M,
    work_dir: str | Path | None = None,
) -> dict:
    """This runtime vs transformers generate (PyTorch, cached) vs this runtime re-feeding, side by side; then
    penwright vs llama.cpp (its binaries in ``llama_cpp``; None leaves it out) at each precision.
    ``only_llama_cpp``: only the llama.cpp comparison, replacing that section of the existing report.
    ``rounds``: interleaved rounds of the cached engines; ``big_shape``: (n_layer, n_head, n_embd) of the
    random "gpt2-124m-shape" model (GPT-2 124M's); ``work_dir``: scratch space (default artifacts/bench/generate),
    removed at the end."""
    import torch
    from transformers import GPT2LMHeadModel

    from penwright.inference.engine import Engine

    tools = llama_tools(llama_cpp) if llama_cpp else None  # before any work: say now if llama.cpp is missing
    if only_llama_cpp and not tools:
        raise PenwrightError("--only-llama-cpp needs llama.cpp's tools: drop --without-llama-cpp")
    quick_onnx = require_export(quick_onnx)
    work = fresh_dir(work_dir or BENCH_DIR / "generate")
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "measured": "greedy decoding, no early stop, same prompt and number of new tokens for every engine; "
        "tokens/s = new tokens (all rows) / wall seconds; first token = prefill + first choice; "
        f"cached engines: median of {rounds} interleaved rounds; no-cache: one run",
        "goals": "(a)/(b) >= 4x quickstart batch 1; >= 2x gpt2-124M-shape batch 1 and 8; (a)/(c) >= 8x at 512 tokens",
        "cases": {},
    }
    try:
        big_hf = _random_124m(work, quick_onnx, big_shape)
        quick = _quickstart_variants(quick_onnx, Path(quick_dir), work)
        models = {"quickstart": (Path(quick_dir), quick), "gpt2-124m-shape": (big_hf, work / "gpt2-124m-random-onnx")}
        if only_llama_cpp:  # the rest of the report stays as it was
            previous = Path(output or "benchmarks/results/bench_generate.json")
            results = json.loads(previous.read_text()) if previous.is_file() else results
        for name, (hf_dir, onnx_dir) in ({} if only_llama_cpp else models).items():
            ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
            for batch in (1, 8):
                results["cases"][f"{name}/batch{batch}"] = _runtime_case(name, onnx_dir, ref, batch, new_tokens, rounds)
            if name == "gpt2-124m-shape":  # batch 1 streams every weight once per token: memory bounds it
                floor = _weights_floor(ref)
                b1 = results["cases"][f"{name}/batch1"]
                torch_ms = 1000 / b1["transformers_generate"]["tokens_per_sec"]
                results["memory_floor"] = {
                    "model": name,
                    **floor,
                    "transformers_ms_per_token_batch1": round(torch_ms, 2),
                    "runtime_ms_per_token_batch1": round(1000 / b1["runtime"]["tokens_per_sec"], 2),
                    "most_runtime_over_transformers_fp32_batch1": round(torch_ms / floor["ms_per_token"], 2),
                }
        if not only_llama_cpp:
            onnx_dir = work / "gpt2-124m-random-onnx"
            engine = Engine.load(onnx_dir, slots=1)
            ids = np.array([engine.encode(PROMPT)])
            n = long_tokens - ids.shape[1]
            log(f"gpt2-124m-shape batch 1: {n} new tokens, cache vs re-feeding")
            a, _ = _time_runtime(engine, ids.tolist(), n)
            c = _time_no_cache(onnx_dir, ids, np.ones_like(ids), n)
            results["cases"][f"gpt2-124m-shape/batch1/{long_tokens}-tokens"] = {
                "new_tokens": n,
                "runtime": a,
                "runtime_no_cache": c,
                "runtime_over_no_cache": round(a["tokens_per_sec"] / c["tokens_per_sec"], 2),
            }
            del engine
        if tools:  # each model in a fresh process: none of the sessions above (or their threads) is alive there
            results["llama_cpp"] = {}
            for name, (hf_dir, onnx_dir) in models.items():
                results["llama_cpp"].update(
                    run_child(
                        __name__,
                        "_child_llama_cpp",
                        str(llama_cpp),
                        name,
                        str(hf_dir),
                        str(onnx_dir),
                        prepared,
                        256,
                        progress=True,
                    )
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        k: {
            m: v[m]
            for m in (
                "runtime_over_transformers",
                "runtime_over_no_cache",
                "runtime_over_padded",
                "graph_over_lean_graph",
                "graph_over_traced_graph",
                "runtime_int8_over_transformers",
            )
            if m in v
        }
        for k, v in results["cases"].items()
    }
    if "llama_cpp" in results:
        summary["llama_cpp"] = {
            k: v["penwright_over_llama_cpp"]
            for k, v in results["llama_cpp"].items()
            if isinstance(v, dict) and "penwright_over_llama_cpp" in v
        }
        summary["top1_agreement_with_fp32"] = results["llama_cpp"].get("quickstart/top1_agreement_with_fp32")
    write_report(
        results,
        output,
        "benchmarks/results/bench_generate.json",
        {**summary, "memory_floor": results.get("memory_floor")},
    )
    return results
