"""``python -m benchmarks site``: the static site's generation in headless Chromium (onnxruntime-web, WASM) side
by side with penwright's Python engine (onnxruntime) on the same graph files, on this machine.

Models: the quickstart (``artifacts/onnx``) and a GPT-2-124M-shaped one with random weights (its unused
vocabulary zeroed, so it writes text); each as fp32 and as the 8-bit graph (``model.q8.onnx``). For each: the
page on one thread (a host without cross-origin isolation), the page on several threads (isolated, as the
site's ``_headers`` asks), and the Python engine on one thread; greedy, ``NEW_TOKENS`` new tokens after the same
prompt (end of text not allowed before them), rounds interleaved, medians. Reported: tokens/s after the first
token, time to first token (prefill and one step, from the call), and the page/Python ratio on one thread.
Goal: the page on one thread at >= 0.5x the Python engine on one thread, same graph, every model and precision.
Beside them, the page's own loop (one ``session.run`` a token, the past passed back) in native onnxruntime on
one thread: the same work as the page, so page / native is what the WebAssembly build costs.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import BENCH_DIR, log, require_export, write_report

NEW_TOKENS = 64
ROUNDS = 5
PROMPT = "And it came to pass"
GOAL = 0.5


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
    driver.set_script_timeout(900)  # (a 124M-shaped model's run on one thread)
    return driver


def _page_run(driver, url: str) -> dict:
    """Load the site at ``url`` (the model loads once), then time one greedy run in the page's own engine."""
    if driver.current_url != url:  # (a new site: load it and its model)
        driver.get(url)
        deadline = time.time() + 300
        while not driver.execute_script("return typeof MODEL !== 'undefined' && MODEL !== null"):
            status = driver.execute_script("return document.getElementById('status').textContent")
            if status.startswith("error") or time.time() > deadline:
                raise RuntimeError(f"{url}: the site did not load its model ({status})")
            time.sleep(0.2)
    result = driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const ids = MODEL.encode(arguments[0]);
        MODEL.generate(ids, {maxTokens: arguments[1], minTokens: arguments[1], temperature: 0})
          .then(r => done({tokens: r.tokens.length, seconds: r.seconds, first: r.firstTokenSeconds, run: r.runSeconds,
                           threads: MODEL.threads}))
          .catch(e => done({error: String(e)}));""",
        PROMPT,
        NEW_TOKENS,
    )
    if "error" in result:
        raise RuntimeError(f"{url}: {result['error']}")
    return result


def _python_run(engine) -> dict:
    from penwright.inference.engine import Request
    from penwright.inference.sampling import GREEDY

    ids = engine.encode(PROMPT)
    request = Request(ids, NEW_TOKENS, GREEDY, min_tokens=NEW_TOKENS)
    start = time.perf_counter()
    engine.submit(request)
    engine.run_until_idle()
    end = time.perf_counter()
    first = (request.first_token_at - request.queued_at) if request.first_token_at else end - start
    return {"tokens": len(request.tokens), "seconds": end - start, "first": first, "threads": 1}


def _plain_run(session, config: dict) -> dict:
    """The page's own loop in native onnxruntime (Python, one thread): the same graph file, one session.run a
    token with the past it returned, greedy. Beside the page it shows what WebAssembly costs the same work."""
    import numpy as np

    layers, heads = config["n_layer"], config["n_head"]
    dim = config["n_embd"] // heads
    names = [o.name for o in session.get_outputs()]
    ids, past, start, tokens = [13, 301, 260, 343], None, 0, []  # (a few tokens: the prompt's length hardly matters)
    begin = time.perf_counter()
    first = None
    while len(tokens) < NEW_TOKENS:
        total = start + len(ids)
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(start, total, dtype=np.int64)[None],
        }
        for layer in range(layers):
            for kv in ("key", "value"):
                empty = np.zeros((1, heads, 0, dim), np.float32)
                feeds[f"past_key_values.{layer}.{kv}"] = past[f"present.{layer}.{kv}"] if past else empty
        out = dict(zip(names, session.run(None, feeds)))
        first = first if first is not None else time.perf_counter() - begin
        start, past = total, out
        token = int(out["logits"][0, -1].argmax())
        tokens.append(token)
        ids = [token]
    return {"tokens": len(tokens), "seconds": time.perf_counter() - begin, "first": first, "threads": 1}


def _speed(run: dict) -> float:
    return (run["tokens"] - 1) / max(1e-9, run["seconds"] - run["first"])


def bench_site(output: str | None = None, quick_dir: str = "artifacts/onnx", work_dir: str | None = None) -> dict:
    import onnxruntime as ort

    from benchmarks.serve import _random_124m_onnx
    from penwright.core.config import compose
    from penwright.export.quantize import quantize_blocks, quantize_int8
    from penwright.inference.engine import Engine
    from penwright.share.site import GRAPHS, node_modules, site, static_server

    quick = require_export(quick_dir)
    work = Path(work_dir or BENCH_DIR) / "site"
    work.mkdir(parents=True, exist_ok=True)
    node_modules(Path("web"))
    copy = work / "quickstart-onnx"  # (the export is a DVC output: its 8-bit graph is made in a copy)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(quick, copy)
    big = work / "gpt2-124m-random-onnx"
    if not (big / "model.onnx").is_file():
        log("exporting a GPT-2-124M-shaped model (random weights)")
        big = _random_124m_onnx(work, quick)
    models = {"quickstart": copy, "gpt2-124m-shape": big}
    graphs = {"quickstart": ("fp32", "int8", "q8"), "gpt2-124m-shape": ("fp32", "int8")}  # (q8 is slow in WASM)
    rounds = {"quickstart": ROUNDS, "gpt2-124m-shape": 3}
    results: dict = {
        "what": f"greedy, {NEW_TOKENS} new tokens after {PROMPT!r}; {ROUNDS} rounds (124M shape: 3) interleaved, "
        "medians; int8: dynamic int8 (the site's default), q8: 8-bit blocks (MatMulNBits)",
        "goal": f"the page on one thread >= {GOAL}x the Python engine on one thread, same graph",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cases": {},
    }
    # one browser a page (one thread, threads): each loads its model once and keeps it, as a visitor's tab does
    drivers = {one: _browser(work / f"chromium-profile-{'one' if one else 'threads'}") for one in (True, False)}
    try:
        for name, folder in models.items():
            if not (folder / "model.q8.onnx").is_file() and "q8" in graphs[name]:
                log(f"{name}: quantizing to model.q8.onnx")
                quantize_blocks(folder / "model.onnx", folder / "model.q8.onnx", 8)
            if not (folder / "model.int8.onnx").is_file():
                log(f"{name}: quantizing to model.int8.onnx")
                quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
            for graph in graphs[name]:
                out = work / f"site-{name}-{graph}"
                site(compose([f"site.model_dir={folder}", f"site.out_dir={out}", f"site.graph={graph}"]))
                file = GRAPHS[graph]
                engine = Engine.load(folder, slots=1, threads=1, graph=file)
                options = ort.SessionOptions()
                options.intra_op_num_threads = options.inter_op_num_threads = 1
                plain = ort.InferenceSession(str(folder / file), options, providers=["CPUExecutionProvider"])
                config = json.loads((folder / "config.json").read_text())
                servers = {one: static_server(out, isolated=not one) for one in (True, False)}
                urls = {one: f"http://127.0.0.1:{s.server_address[1]}/index.html" for one, s in servers.items()}
                runs: dict[str, list[dict]] = {
                    "python_1_thread": [],
                    "native_plain_1_thread": [],
                    "page_1_thread": [],
                    "page_threads": [],
                }
                try:
                    _python_run(engine)  # (warm-up: sessions and first shapes)
                    for one in (True, False):
                        _page_run(drivers[one], urls[one])  # (loads the model; warm-up)
                    for r in range(rounds[name]):
                        log(f"{name} {graph}: round {r + 1}/{rounds[name]}")
                        runs["python_1_thread"].append(_python_run(engine))
                        runs["native_plain_1_thread"].append(_plain_run(plain, config))
                        runs["page_1_thread"].append(_page_run(drivers[True], urls[True]))
                        runs["page_threads"].append(_page_run(drivers[False], urls[False]))
                finally:
                    for s in servers.values():
                        s.shutdown()
                case = {
                    k: {
                        "tokens_per_s": round(statistics.median(_speed(x) for x in v), 1),
                        "first_token_s": round(statistics.median(x["first"] for x in v), 4),
                        "threads": v[0]["threads"],
                    }
                    for k, v in runs.items()
                }
                case["page_vs_python_1_thread"] = round(
                    case["page_1_thread"]["tokens_per_s"] / case["python_1_thread"]["tokens_per_s"], 2
                )
                case["page_vs_native_plain_1_thread"] = round(
                    case["page_1_thread"]["tokens_per_s"] / case["native_plain_1_thread"]["tokens_per_s"], 2
                )
                case["graph_mib"] = round((folder / file).stat().st_size / 2**20, 1)
                results["cases"][f"{name}/{graph}"] = case
                log(f"{name} {graph}: {json.dumps(case)}")
    finally:
        for driver in drivers.values():
            driver.quit()
        shutil.rmtree(work, ignore_errors=True)  # (sites of a 124M-shaped model: gigabytes)
    summary = {k: v["page_vs_python_1_thread"] for k, v in results["cases"].items()}
    results["goal_met"] = all(v >= GOAL for v in summary.values())
    write_report(results, output, "benchmarks/results/bench_site.json", summary)
    return results
