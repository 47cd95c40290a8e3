"""MkDocs hook: the benchmark tables of docs/benchmarks.md, rendered from benchmarks/results/*.json at build time.

docs/benchmarks.md holds markers such as ``<!-- bench:generate -->``; each is replaced by markdown tables read from
the result files the benchmarks write (``python -m benchmarks <stage>``, ``python -m benchmarks.engine_ab``, ...),
so the page always shows the figures on record, never numbers copied by hand. Each table says the machine and the
date it was measured on, as far as the file records them ("date not recorded" where it does not).

A marker whose file is missing, or a marker this hook does not know, fails the build: the page must not silently
lose a table. Run ``python docs/hooks/benchmark_tables.py [MARKER ...]`` to print the rendered markdown.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"  # relative to the directory of mkdocs.yml (the repository root)
PAGE = "benchmarks.md"
MARKER = re.compile(r"<!--\s*bench:([a-z0-9_-]+)\s*-->")


class MissingResults(Exception):
    """A result file a marker needs is not in benchmarks/results/."""


# --- formatting -------------------------------------------------------------------------------------------------


def num(value: Any) -> str:
    """A number as the file holds it (``4300.4`` stays ``4300.4``); None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def ratio(value: Any) -> str:
    return "–" if value is None else f"{value}x"


def pct(value: Any) -> str:
    return "–" if value is None else f"{round(100 * value, 2)}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(data: dict, name: str, date: str | None = None) -> str:
    """One line: the file, the machine and the date it was measured on, as far as the file records them."""
    parts: list[str] = []
    machine = data.get("machine")
    if isinstance(machine, dict):
        parts += [f"{key} {value}" for key, value in machine.items()]
    elif machine:
        parts.append(str(machine))
    for key in ("platform", "cpu", "cpu_model", "processor"):
        if data.get(key) and not isinstance(data[key], dict):
            parts.append(f"{key} {data[key]}")
    where = ", ".join(parts) if parts else "machine not recorded"
    when = date or data.get("date") or "date not recorded"
    return f"*`{RESULTS}/{name}` · measured on: {where} · {when}*"


def note(title: str, text: str | None) -> str:
    """A collapsed note (pymdownx.details) holding the file's own description of the method."""
    if not text:
        return ""
    return f'??? note "{title}"\n    {text}\n'


# --- the renderers, one per marker ------------------------------------------------------------------------------


def render_prepare(load: Callable[[str], dict]) -> str:
    name = "bench_prepare.json"
    d = load(name)
    rows = []
    sample = d.get("sample")
    if sample:
        rows.append(["sample corpus", num(sample["mb"]), num(sample["mb_per_s"]), num(sample["peak_rss_mb"]), "–", "–"])
    for key in sorted((k for k in d if re.fullmatch(r"generated_\d+mb", k)), key=lambda k: int(k[10:-2])):
        run, base = d[key], d.get(f"{key}_tokenizers") or {}
        speedup = round(run["mb_per_s"] / base["mb_per_s"], 1) if base.get("mb_per_s") else None
        rows.append(
            [
                f"generated, {num(run['mb'])} MB",
                num(run["mb"]),
                num(run["mb_per_s"]),
                num(run["peak_rss_mb"]),
                f"{num(base.get('mb_per_s'))} MB/s, {num(base.get('peak_rss_mb'))} MB",
                ratio(speedup),
            ]
        )
    out = [
        provenance(d, name),
        "",
        table(
            [
                "corpus",
                "MB",
                "prepare MB/s",
                "peak RSS MB",
                "`tokenizers` batch API beside it",
                "prepare / `tokenizers`",
            ],
            rows,
        ),
        "",
        f"Peak RSS after the imports alone: {num(d.get('import_rss_mb'))} MB.",
    ]
    enc = d.get("encoders_on_sample")
    if enc:
        out += [
            "",
            f"The encoders alone on the sample corpus ({num(enc.get('mb'))} MB; identical ids: "
            f"{num(enc.get('identical_ids'))}):",
            "",
            table(
                ["encoder", "MB/s"],
                [
                    ["splintr, every core", num(enc.get("splintr", {}).get("mb_per_s"))],
                    ["splintr, 1 thread", num(enc.get("splintr_1_thread", {}).get("mb_per_s"))],
                    ["`tokenizers` batch API", num(enc.get("tokenizers_encode_batch_fast", {}).get("mb_per_s"))],
                ],
            ),
        ]
    if d.get("goal"):
        out += ["", f"Goal: {d['goal']}."]
    return "\n".join(out)


def render_train(load: Callable[[str], dict]) -> str:
    name = "bench_train.json"
    d = load(name)
    med, best = d.get("median_tokens_per_sec", {}), d.get("best_tokens_per_sec", {})
    model, batch = d.get("model", {}), d.get("batch", {})
    out = [
        provenance(d, name),
        "",
        f"Model: {num(model.get('n_layer'))} layers, {num(model.get('n_head'))} heads, {num(model.get('n_embd'))} wide; "
        f"batch {num(batch.get('batch_size'))} x {num(batch.get('block_size'))} tokens.",
        "",
        table(
            ["loop", "median tokens/s", "best tokens/s", "each round"],
            [
                [
                    loop,
                    num(med.get(key)),
                    num(best.get(key)),
                    ", ".join(num(v) for v in d.get("tokens_per_sec", {}).get(key, [])),
                ]
                for loop, key in (("Lightning (`penwright train`)", "lightning"), ("plain PyTorch loop", "plain"))
            ],
        ),
        "",
        f"Lightning's overhead, medians: {num(d.get('lightning_overhead_pct_median'))}% "
        f"(round-to-round spread {num(d.get('round_to_round_spread_pct'))}%). Goal: {d.get('goal', '–')}.",
    ]
    quick = d.get("quickstart_from_reports_train_json")
    if quick:
        out += [
            "",
            f"The quickstart's training run (`reports/train.json`): {num(quick.get('steps'))} steps in "
            f"{num(quick.get('wall_seconds'))} s, {num(quick.get('tokens_per_sec'))} tokens/s, "
            f"val bpb {num(quick.get('val_bpb'))}.",
        ]
    out += ["", note("How it was measured", d.get("measured"))]
    return "\n".join(out)


def render_train_lora(load: Callable[[str], dict]) -> str:
    name = "bench_train.json"
    d = load(name)
    lora = d.get("lora")
    if not lora:
        return f"`{RESULTS}/{name}` has no `lora` section yet: `python -m benchmarks train --lora` adds it."
    batch = lora.get("batch", {})
    rows = []
    for shape in lora.get("shapes", {}):
        full, ad, rel = lora[shape]["full"], lora[shape]["lora"], lora[shape].get("lora_over_full", {})
        rows.append(
            [
                shape,
                f"{num(full['peak_rss_gb'])} / {num(ad['peak_rss_gb'])} GB ({ratio(rel.get('peak_rss'))})",
                f"{num(full['tokens_per_sec'])} / {num(ad['tokens_per_sec'])} ({ratio(rel.get('tokens_per_sec'))})",
                f"{num(full['checkpoint_mb'])} / {num(ad['checkpoint_mb'])} MB ({ratio(rel.get('checkpoint_size'))})",
                f"{num(full['loss_first'])} → {num(full['loss_last'])} / {num(ad['loss_first'])} → {num(ad['loss_last'])}",
            ]
        )
    return "\n".join(
        [
            provenance(d, name),
            "",
            f"{num(batch.get('steps'))} steps of {num(batch.get('batch_size'))} x {num(batch.get('block_size'))} tokens, "
            + (
                f"timed after {num(batch['untimed_steps'])} untimed ones"
                if "untimed_steps" in batch
                else "tokens/s of the median step"
            )
            + "; random weights in the real shapes.",
            "",
            table(
                ["shape", "peak RSS full / LoRA", "tokens/s full / LoRA", "checkpoint full / LoRA", "loss full / LoRA"],
                rows,
            ),
            "",
            note("How it was measured", lora.get("measured")),
        ]
    )


GENERATE_ENGINES = (
    ("runtime", "engine (fused graph)"),
    ("runtime_lean_graph", "engine, lean graph"),
    ("runtime_traced_graph", "engine, traced graph"),
    ("runtime_int8", "engine, int8 graph"),
    ("transformers_generate", "`transformers` generate"),
    ("runtime_no_cache", "graph re-fed, no cache"),
)


def render_generate(load: Callable[[str], dict]) -> str:
    name = "bench_generate.json"
    d = load(name)
    out = [provenance(d, name), ""]
    for case, c in d.get("cases", {}).items():
        rows = [
            [label, num(c[key]["tokens_per_sec"]), num(c[key]["first_token_ms"])]
            for key, label in GENERATE_ENGINES
            if key in c
        ]
        facts = []
        for key, label in (
            ("runtime_over_transformers", "engine / transformers"),
            ("runtime_over_no_cache", "engine / no cache"),
            ("graph_over_lean_graph", "fused / lean"),
            ("graph_over_traced_graph", "fused / traced"),
            ("runtime_int8_over_transformers", "int8 / transformers"),
        ):
            if key in c:
                facts.append(f"{label} {ratio(c[key])}")
        if "same_tokens_as_transformers" in c:
            facts.append(f"same tokens as transformers: {num(c['same_tokens_as_transformers'])}")
        out += [
            f"**{case}** ({num(c.get('new_tokens'))} new tokens; {c.get('provider', 'cpu')}): "
            + ", ".join(facts)
            + ".",
            "",
            table(["engine", "tokens/s", "first token ms"], rows),
            "",
        ]
    floor = d.get("memory_floor")
    if floor:
        out += [
            f"**Memory floor, {floor.get('model')}**: {num(floor.get('matrices'))} weight matrices, "
            f"{num(floor.get('weights_mb'))} MB a token, read at {num(floor.get('read_gb_per_s'))} GB/s by the fastest "
            f"plain matrix-vector chain: {num(floor.get('ms_per_token'))} ms a token, against the engine's "
            f"{num(floor.get('runtime_ms_per_token_batch1'))} ms and transformers' "
            f"{num(floor.get('transformers_ms_per_token_batch1'))} ms at batch 1 (no fp32 engine can beat transformers "
            f"by more than {ratio(floor.get('most_runtime_over_transformers_fp32_batch1'))} here).",
            "",
        ]
    out += [f"Goals: {d.get('goals', '–')}.", "", note("How it was measured", d.get("measured"))]
    return "\n".join(out)


def render_generate_llama_cpp(load: Callable[[str], dict]) -> str:
    name = "bench_generate.json"
    d = load(name)
    ll = d.get("llama_cpp")
    if not ll:
        return f"`{RESULTS}/{name}` has no `llama_cpp` section: `python -m benchmarks generate` adds it."
    batch1, batched, agreement = [], [], []
    for case, c in ll.items():
        if not isinstance(c, dict) or "penwright" not in c:
            continue
        theirs = next((v for k, v in c.items() if k.startswith("llama_cpp_") and isinstance(v, dict)), None)
        if theirs is not None:  # batch 1: llama-bench
            rounds = c.get("ratio_each_round_min_median_max") or []
            alone = c.get("onnxruntime_matmuls_alone") or {}
            batch1.append(
                [
                    case,
                    num(c["penwright"]["tokens_per_sec"]),
                    num(theirs.get("tokens_per_sec")),
                    ratio(c.get("penwright_over_llama_cpp")),
                    " / ".join(ratio(v) for v in rounds) if rounds else "–",
                    f"{num(c.get('onnx_mb'))} / {num(c.get('gguf_mb'))}",
                    num(alone.get("ms_per_token")) if alone else "",
                    num(alone.get("plain_c", {}).get("ms_per_token")) if alone else "",
                    num(alone.get("llama_cpp_f32_ms_per_token")) if alone else "",
                ]
            )
        else:  # batched: llama-batched-bench
            batched.append(
                [
                    case,
                    num(c["penwright"]["tokens_per_sec"]),
                    num(c.get("llama_cpp_f32_decode_tokens_per_sec")),
                    ratio(c.get("penwright_over_llama_cpp")),
                ]
            )
    for case, c in ll.items():
        if case.endswith("top1_agreement_with_fp32"):
            agreement.append(
                [
                    case.split("/")[0],
                    num(c.get("tokens")),
                    pct(c.get("penwright_q8")),
                    pct(c.get("llama_cpp_q8_0")),
                    pct(c.get("penwright_q4")),
                    pct(c.get("llama_cpp_q4_0")),
                    pct(c.get("llama_cpp_f32_vs_penwright_fp32")),
                ]
            )
    out = [
        provenance(d, name),
        "",
        f"Batch 1, {num(ll.get('new_tokens'))} new tokens, {num(ll.get('threads'))} threads "
        "(tokens/s, medians of the rounds; then their ratio, and the lowest, median and highest of the rounds' own "
        "ratios; the last three columns, fp32 rows only, are ms a token: onnxruntime's MatMuls alone, the same "
        "matrices through a plain C loop, llama.cpp's whole token):",
        "",
        table(
            [
                "model / precision",
                "penwright",
                "llama.cpp",
                "penwright / llama.cpp",
                "rounds min / median / max",
                "ONNX / GGUF MB",
                "MatMuls alone",
                "plain C",
                "llama.cpp",
            ],
            batch1,
        ),
    ]
    if batched:
        out += [
            "",
            "Batched decoding (tokens/s; llama.cpp: `llama-batched-bench`'s decode rate):",
            "",
            table(["model / batch / precision", "penwright", "llama.cpp", "penwright / llama.cpp"], batched),
        ]
    if agreement:
        out += [
            "",
            "Top-1 agreement with fp32 on validation windows:",
            "",
            table(
                [
                    "model",
                    "positions",
                    "penwright q8",
                    "llama.cpp q8_0",
                    "penwright q4",
                    "llama.cpp q4_0",
                    "llama.cpp f32 vs penwright fp32",
                ],
                agreement,
            ),
        ]
    floor = ll.get("memory_floor_124m_fp32")
    if floor:
        ms, over = floor.get("ms_per_token", {}), floor.get("floor_over_engine", {})
        out += [
            "",
            f"**Memory floor, 124M shape, fp32**: {num(floor.get('weights_mb'))} MB of weights a token, "
            f"{num(floor.get('read_gb_per_s'))} GB/s by the fastest plain chain; penwright {num(ms.get('penwright'))} ms "
            f"and llama.cpp {num(ms.get('llama_cpp_f32'))} ms a token (floor / engine: {num(over.get('penwright'))} and "
            f"{num(over.get('llama_cpp_f32'))}; above 1 means faster than that chain).",
        ]
    out += ["", note("How it was measured", ll.get("measured"))]
    return "\n".join(out)


def render_serve(load: Callable[[str], dict]) -> str:
    name = "bench_serve.json"
    d = load(name)
    out = [provenance(d, name), ""]
    for model, m in d.get("models", {}).items():
        rows = []
        for level, lv in m.get("levels", {}).items():
            b, one = lv["batching"], lv["one_at_a_time"]
            rows.append(
                [
                    level,
                    num(b["tokens_per_sec"]),
                    num(one["tokens_per_sec"]),
                    ratio(lv.get("batching_over_one_at_a_time")),
                    f"{num(b['ttft_p95_s'])} / {num(one['ttft_p95_s'])}",
                    f"{num(b['latency_p95_s'])} / {num(one['latency_p95_s'])}",
                    f"{num(b['answered'])}/{num(b['sent'])}, {num(one['answered'])}/{num(one['sent'])}",
                ]
            )
        rss = m.get("server_rss_mb", {})
        codes = m.get("exit_codes_on_sigterm", {})
        overrides = " ".join(f"`{o}`" for o in m.get("server_overrides", [])) or "none"
        out += [
            f"**{model}** ({num(m.get('new_tokens_per_request'))} tokens a request, {num(m.get('slots'))} slots; "
            f"server overrides: {overrides}; RSS {num(rss.get('batching'))} / {num(rss.get('one_at_a_time'))} MB; "
            f"exit codes on SIGTERM {num(codes.get('batching'))} / {num(codes.get('one_at_a_time'))}):",
            "",
            table(
                [
                    "concurrency",
                    "batching tokens/s",
                    "one at a time tokens/s",
                    "batching / one at a time",
                    "p95 first token s (batching / one)",
                    "p95 latency s (batching / one)",
                    "answered/sent (batching, one)",
                ],
                rows,
            ),
            "",
        ]
    out += [f"Goals: {d.get('goals', '–')}.", "", note("How it was measured", d.get("measured"))]
    return "\n".join(out)


def _llama_server_tables(d: dict, name: str) -> list[str]:
    ls = d["llama_server"]
    out = []
    for model, precisions in ls.get("models", {}).items():
        for precision, e in precisions.items():
            rows = []
            for level, lv in e.get("levels", {}).items():
                pw, ll = lv["penwright"], lv["llama_server"]
                rows.append(
                    [
                        level,
                        num(pw["tokens_per_sec"]),
                        num(ll["tokens_per_sec"]),
                        ratio(lv.get("penwright_over_llama_server")),
                        f"{num(pw['ttft_p95_s'])} / {num(ll['ttft_p95_s'])}",
                        f"{num(pw['answered'])}/{num(pw['sent'])}, {num(ll['answered'])}/{num(ll['sent'])}",
                        num(pw.get("repetitions")),
                    ]
                )
            rss = e.get("server_rss_mb", {})
            out += [
                f"**{model}, {precision}** (`{e.get('graph')}` against `{e.get('gguf')}`; RSS "
                f"{num(rss.get('penwright'))} / {num(rss.get('llama_server'))} MB):",
                "",
                provenance(d, name, date=e.get("date")),
                "",
                table(
                    [
                        "concurrency",
                        "penwright tokens/s",
                        "llama-server tokens/s",
                        "penwright / llama-server",
                        "p95 first token s (penwright / llama-server)",
                        "answered/sent (penwright, llama-server)",
                        "repetitions",
                    ],
                    rows,
                ),
                "",
            ]
    return out


def render_serve_llama_server(load: Callable[[str], dict]) -> str:
    name = "bench_serve.json"
    d = load(name)
    if "llama_server" not in d:
        return f"`{RESULTS}/{name}` has no `llama_server` section: `python -m benchmarks serve --llama-server` adds it."
    ls = d["llama_server"]
    out = [
        f"{num(ls.get('new_tokens'))} new tokens a request, {num(ls.get('slots'))} slots on each server.",
        "",
        *_llama_server_tables(d, name),
        f"Goals: {ls.get('goals', '–')}.",
        "",
        note("How it was measured", ls.get("measured")),
    ]
    return "\n".join(out)


def render_serve_llama_server_earlier(load: Callable[[str], dict], files: list[str]) -> str:
    out = []
    for name in files:
        d = load(name)
        if "llama_server" not in d:
            continue
        out += [f"#### `{name}`", "", *_llama_server_tables(d, name)]
    return "\n".join(out) if out else f"No earlier llama-server runs in `{RESULTS}/`."


def render_lora_quality(load: Callable[[str], dict]) -> str:
    name = "lora_quality.json"
    d = load(name)
    rows = []
    for run, r in d.get("runs", {}).items():
        adapter = r.get("adapter_bytes")
        rows.append(
            [
                run,
                f"`{r.get('command', '')}`",
                num(r.get("val_bpb")),
                ", ".join(num(v) for v in r.get("val_bpb_each_100_steps", [])),
                num(r.get("tokens_per_sec")),
                f"{round(adapter / 1e6, 2)} MB" if adapter else "",
            ]
        )
    return "\n".join(
        [
            provenance(d, name),
            "",
            f"{d.get('what', '')}",
            "",
            table(["run", "command", "val bpb", "val bpb every 100 steps", "tokens/s", "adapter"], rows),
            "",
            f"Best LoRA / best full finetune (val bpb): {ratio(d.get('best_lora_over_best_full'))}. "
            f"Goal: {d.get('goal', '–')}.",
        ]
    )


def render_copies(load: Callable[[str], dict]) -> str:
    name = "bench_copies.json"
    d = load(name)
    rows = [
        [
            f"{num(r.get('text_mb'))} MB",
            num(r.get("tokens")),
            f"{num(r.get('build_seconds'))} s",
            f"{num(r.get('build_peak_rss_gib'))} GiB",
            f"{num(r.get('index_gib_on_disk'))} GiB",
            f"{num(r.get('lookup_ms_p50'))} ms",
            f"{num(r.get('lookup_ms_p95'))} ms",
        ]
        for r in d.get("sizes", [])
    ]
    header = ["text", "tokens", "build", "build peak RSS", "on disk", "lookup p50", "lookup p95"]
    return "\n".join(
        [
            provenance(d, name),
            "",
            f"{d.get('what', '')}; {num(d.get('lookups'))} lookups of {num(d.get('window_tokens'))} tokens each. "
            f"Goals: {d.get('goals', '–')}.",
            "",
            table(header, rows),
        ]
    )


def render_site(load: Callable[[str], dict]) -> str:
    name = "bench_site.json"
    d = load(name)
    rows = []
    for case, c in d.get("cases", {}).items():
        py, one, many = c.get("python_1_thread", {}), c.get("page_1_thread", {}), c.get("page_threads", {})
        plain = c.get("native_plain_1_thread", {})
        rows.append(
            [
                case,
                f"{num(c.get('graph_mib'))} MiB",
                num(py.get("tokens_per_s")),
                num(plain.get("tokens_per_s")),
                num(one.get("tokens_per_s")),
                f"{num(many.get('tokens_per_s'))} ({num(many.get('threads'))} threads)",
                f"{num(py.get('first_token_s'))} / {num(one.get('first_token_s'))} / {num(many.get('first_token_s'))} s",
                ratio(c.get("page_vs_python_1_thread")),
                ratio(c.get("page_vs_native_plain_1_thread")),
            ]
        )
    header = [
        "model / graph",
        "graph",
        "Python engine, 1 thread (tokens/s)",
        "the page's loop in native onnxruntime, 1 thread",
        "page, 1 thread",
        "page, threads",
        "first token: Python / page 1 / page threads",
        "page / Python, 1 thread",
        "page / native loop",
    ]
    return "\n".join(
        [provenance(d, name), "", f"{d.get('what', '')}. Goal: {d.get('goal', '–')}.", "", table(header, rows)]
    )


def render_cold(load: Callable[[str], dict]) -> str:
    name = "bench_cold.json"
    d = load(name)
    out = [provenance(d, name), "", f"{d.get('what', '')}", ""]
    for model, e in d.get("models", {}).items():
        ours, theirs = e.get("penwright", {}), e.get("llama_server", {})
        out += [
            f"**{model}** ({e.get('starts', d.get('starts'))} starts, {e.get('date', d.get('date'))}): "
            f"start-up {num(ours.get('startup_s'))} s (llama-server {num(theirs.get('startup_s'))} s); "
            f"the very first request's first token {num(ours.get('first_request_ttft_s'))} s "
            f"(llama-server {num(theirs.get('first_request_ttft_s'))} s).",
            "",
        ]
        rows = []
        for c, levels in ours.get("levels", {}).items():
            for phase in ("cold", "warm"):
                a, b = levels.get(phase, {}), theirs.get("levels", {}).get(c, {}).get(phase, {})
                rows.append(
                    [
                        c,
                        phase,
                        num(a.get("tokens_per_sec")),
                        num(b.get("tokens_per_sec")),
                        ratio(e.get("ratios", {}).get(c, {}).get(phase)),
                        f"{num(a.get('ttft_p95_s'))} / {num(b.get('ttft_p95_s'))} s",
                        " ".join(f"{1000 * v:.0f}" for v in a.get("ttft_deciles_s", [])),
                        " ".join(f"{1000 * v:.0f}" for v in b.get("ttft_deciles_s", [])),
                    ]
                )
        header = [
            "clients",
            "round",
            "penwright tokens/s",
            "llama-server tokens/s",
            "ratio",
            "p95 first token, penwright / llama-server",
            "first-token deciles (ms), penwright",
            "llama-server",
        ]
        out += [table(header, rows), ""]
        if variant := e.get("variant"):
            label = " ".join(f"`{o}`" for o in variant.get("overrides", []))
            rows = [
                [
                    c,
                    phase,
                    num(levels.get(phase, {}).get("tokens_per_sec")),
                    num(variant.get("levels", {}).get(c, {}).get(phase, {}).get("tokens_per_sec")),
                    f"{num(levels.get(phase, {}).get('ttft_p95_s'))} / "
                    f"{num(variant.get('levels', {}).get(c, {}).get(phase, {}).get('ttft_p95_s'))} s",
                ]
                for c, levels in ours.get("levels", {}).items()
                for phase in ("cold", "warm")
            ]
            out += [
                f"The default beside {label} (a third server in the same turns; start-up "
                f"{num(ours.get('startup_s'))} / {num(variant.get('startup_s'))} s):",
                "",
                table(["clients", "round", "tokens/s, default", f"tokens/s, {label}", "p95 first token"], rows),
                "",
            ]
        panels = [
            (f"{c} client{'s' if c != '1' else ''}", _ttfts(levels, theirs.get("levels", {}).get(c, {})))
            for c, levels in ours.get("levels", {}).items()
        ]
        out += [f"First-token times, {model} (the share of first tokens within each time):", "", cdf_svg(panels), ""]
    return "\n".join(out)


SERIES = {  # name -> (color, dash)
    "penwright, cold": ("#1f5fbf", ""),
    "penwright, warm": ("#1f5fbf", "5 3"),
    "llama-server, cold": ("#d9731a", ""),
    "llama-server, warm": ("#d9731a", "5 3"),
}


def _ttfts(ours: dict, theirs: dict) -> dict[str, list[float]]:
    """A level's first-token times (s) per series: every one the file keeps, else its deciles."""
    out = {}
    for who, levels in (("penwright", ours), ("llama-server", theirs)):
        for phase in ("cold", "warm"):
            e = levels.get(phase, {})
            out[f"{who}, {phase}"] = sorted(e.get("ttfts_s") or e.get("ttft_deciles_s") or [])
    return out


def cdf_svg(panels: list[tuple[str, dict[str, list[float]]]], w: int = 230, h: int = 170) -> str:
    """Small multiples of empirical CDFs as one inline SVG: a panel per title, x the time in ms on a log scale
    (the panel's smallest to its largest: a stall far out does not squash the rest), y the share of values at or
    below it, one line per series (colors and dashes: SERIES)."""
    left, bottom, top, right = 34, 30, 22, 10
    pw, ph = w - left - right, h - top - bottom
    parts = []
    for k, (title, series) in enumerate(panels):
        x0, y0 = k * w + left, top
        values_ms = [1000 * v for vs in series.values() for v in vs if v > 0] or [1.0, 10.0]
        lo, hi = min(values_ms) * 0.9, max(values_ms) * 1.1

        def at(ms: float, x0=x0, lo=lo, hi=hi) -> float:  # x of a time in the panel
            return x0 + pw * math.log(max(ms, lo) / lo) / math.log(hi / lo)

        parts.append(f'<text x="{x0 + pw / 2}" y="14" text-anchor="middle" font-size="12">{title}</text>')
        parts.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        middle = y0 + ph / 2  # the median's gridline
        parts.append(f'<line x1="{x0}" y1="{middle}" x2="{x0 + pw}" y2="{middle}" stroke="#ddd"/>')
        for frac, label in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
            y = y0 + ph * (1 - frac)
            parts.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end" font-size="10">{label}</text>')
        for ms in (lo, math.sqrt(lo * hi), hi):
            label = f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"
            parts.append(
                f'<text x="{at(ms):.1f}" y="{y0 + ph + 13}" text-anchor="middle" font-size="10">{label}</text>'
            )
        parts.append(
            f'<text x="{x0 + pw / 2}" y="{y0 + ph + 26}" text-anchor="middle" font-size="10">ms (log scale)</text>'
        )
        for name, values in series.items():
            if not values:
                continue
            color, dash = SERIES[name]
            n, points = len(values), [f"{x0:.1f},{y0 + ph:.1f}"]
            for i, v in enumerate(values):
                x = at(1000 * v)
                points += [f"{x:.1f},{y0 + ph * (1 - i / n):.1f}", f"{x:.1f},{y0 + ph * (1 - (i + 1) / n):.1f}"]
            style = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}"{style}/>')
    legend_y = h + 6
    for k, (name, (color, dash)) in enumerate(SERIES.items()):
        x = left + k * 150
        style = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{x}" y1="{legend_y}" x2="{x + 24}" y2="{legend_y}" stroke="{color}"{style}/>')
        parts.append(f'<text x="{x + 28}" y="{legend_y + 4}" font-size="11">{name}</text>')
    width, height = max(len(panels) * w, left + len(SERIES) * 150), h + 16
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="first-token time distributions">' + "".join(parts) + "</svg>"
    )


def render_recipe(load: Callable[[str], dict]) -> str:
    name = "bench_recipe.json"
    d = load(name)
    out = [
        provenance(d, name),
        "",
        f"Held out: the last 10% of the sample corpus's books in order; nanoGPT's CPU recipe at the same training wall "
        f"time: {num(d.get('nanogpt_reference_bpb'))} bits per byte (the fixed reference); the goal: "
        f"{num(d.get('goal_bpb'))} or less. Runs of each recipe: {d.get('runs')}, in turns.",
        "",
    ]
    rows = []
    for recipe, e in d.get("summary", {}).items():
        rows.append(
            [
                recipe,
                " ".join(f"`{o}`" for o in e.get("overrides", [])) or "(the quickstart's defaults when it ran)",
                num(e.get("held_out_bpb")),
                ratio(e.get("vs_nanogpt")),
                num(e.get("wall_seconds_median")),
                ratio(e.get("wall_vs_default")) if "wall_vs_default" in e else "",
            ]
        )
    header = ["recipe", "overrides", "held-out bits per byte", "vs nanoGPT", "train wall s (median)", "wall vs default"]
    return "\n".join([*out, table(header, rows), ""])


def render_step(load: Callable[[str], dict]) -> str:
    name = "bench_step.json"
    d = load(name)
    shape = d.get("shape", {})
    what = (
        f"One training step (forward, backward, clipping, AdamW) of a {shape.get('n_layer')}x{shape.get('n_embd')} "
        f"GPT-2 (vocabulary {shape.get('vocab_size')}), {shape.get('batch_size')} windows of "
        f"{shape.get('block_size')} tokens; each way in a fresh process, in turns, {d.get('rounds')} rounds of "
        f"{d.get('steps')} steps."
    )
    rounds = d.get("step_ms", {})
    rows = [
        [way, num(e.get("step_ms_median")), ", ".join(num(m) for m in rounds.get(way, [])), ratio(e.get("vs_gelu_new"))]
        for way, e in d.get("summary", {}).items()
    ]
    header = ["the step", "median ms", "each round (ms)", "vs gelu_new"]
    return "\n".join([provenance(d, name), "", what, "", table(header, rows), ""])


def render_soak(load: Callable[[str], dict]) -> str:
    name = "bench_soak.json"
    d = load(name)
    setup = d.get("setup", {})
    out = [
        provenance(d, name),
        "",
        f"{setup.get('requests')} streamed completions of {setup.get('new_tokens')} tokens, {setup.get('concurrency')} at "
        f"a time, {setup.get('slots')} slots of {setup.get('context')} tokens; resident memory read every "
        f"{setup.get('round')} requests. Goal: the last reading within {pct((setup.get('goal_rss_growth') or 1) - 1)} "
        "of the first, every request answered.",
        "",
    ]
    rows = []
    for model, e in d.get("models", {}).items():
        rows.append(
            [
                model,
                e.get("date", d.get("date", "")),
                num(e.get("rss_first_round_mb")),
                num(e.get("rss_last_round_mb")),
                ratio(e.get("rss_growth")),
                f"{e.get('answered')} / {e.get('failed')}",
                " ".join(num(r.get("rss_mb")) for r in e.get("rounds", [])),
            ]
        )
    header = [
        "model",
        "measured",
        "RSS after the first round (MB)",
        "after the last",
        "growth",
        "answered / failed",
        "every reading (MB)",
    ]
    return "\n".join([*out, table(header, rows), ""])


def render_chat(load: Callable[[str], dict]) -> str:
    name = "chat_vs_completions.json"
    d = load(name)
    rows = [
        [str(i), num(r.get("chat")), num(r.get("completions")), ratio(r.get("ratio"))]
        for i, r in enumerate(d.get("rounds", []), start=1)
    ]
    rows.append(
        [
            "median",
            num(d.get("chat_tokens_per_sec_median")),
            num(d.get("completions_tokens_per_sec_median")),
            ratio(d.get("ratio_median")),
        ]
    )
    return "\n".join(
        [
            provenance(d, name, d.get("date")),
            "",
            f"{d.get('what', '')}: concurrency {num(d.get('concurrency'))}, {num(d.get('requests_per_round'))} "
            f"requests of {num(d.get('tokens_per_request'))} tokens per kind a round; model: {d.get('model', '–')}.",
            "",
            table(["round", "chat tokens/s", "completions tokens/s", "chat / completions"], rows),
            *(["", f"Note: {d['note']}"] if d.get("note") else []),
        ]
    )


def _ab_rows(d: dict, group: str) -> list[list[str]]:
    """Every measurement in an A/B file: the main ``batches`` / ``levels`` and any extra run beside them."""
    rows: list[tuple[str, dict]] = []
    for key, value in d.get(group, {}).items():
        if isinstance(value, dict) and "head_over_base_median_ratio" in value:
            rows.append((f"batch {key}" if group == "batches" else key.replace("_", " "), value))
    for key, value in d.items():
        if isinstance(value, dict) and "head_over_base_median_ratio" in value:
            rows.append((key.replace("_", " "), value))
    return [
        [
            label,
            num(v.get("base_tokens_per_sec")),
            num(v.get("head_tokens_per_sec")),
            ratio(v.get("head_over_base_median_ratio")),
            f"{min(v['ratios_each_round'])}-{max(v['ratios_each_round'])}" if v.get("ratios_each_round") else "–",
        ]
        for label, v in rows
    ]


def render_ab(load: Callable[[str], dict], files: list[str]) -> str:
    if not files:
        return f"No A/B results in `{RESULTS}/`."
    out = []
    for name in files:
        d = load(name)
        group = "batches" if "batches" in d else "levels"
        extra = []
        if "rounds" in d:
            extra.append(f"{num(d['rounds'])} rounds")
        if "tokens" in d:
            extra.append(f"{num(d['tokens'])} tokens")
        if "requests_per_round" in d:
            extra.append(f"{num(d['requests_per_round'])} requests a round")
        if d.get("sample"):
            extra.append("sampled, streamed requests")
        out += [
            f"**`{name}`**: `{d.get('base')}` → `{d.get('head')}`; {', '.join(extra)}; model: {d.get('model', '–')}",
            "",
            provenance(d, name),
            "",
            table(
                ["measurement", "base tokens/s", "head tokens/s", "head / base (median)", "rounds' ratios"],
                _ab_rows(d, group),
            ),
            "",
        ]
        if d.get("note"):
            out += [f"Note: {d['note']}", ""]
    return "\n".join(out)


def _glob(results: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in results.glob(pattern))


def renderers(results: Path) -> dict[str, Callable[[Callable[[str], dict]], str]]:
    return {
        "prepare": render_prepare,
        "train": render_train,
        "train-lora": render_train_lora,
        "generate": render_generate,
        "generate-llama-cpp": render_generate_llama_cpp,
        "serve": render_serve,
        "serve-llama-server": render_serve_llama_server,
        "serve-llama-server-earlier": lambda load: render_serve_llama_server_earlier(
            load, _glob(results, "bench_serve_llama_*.json")
        ),
        "lora-quality": render_lora_quality,
        "chat": render_chat,
        "copies": render_copies,
        "site": render_site,
        "cold": render_cold,
        "recipe": render_recipe,
        "step": render_step,
        "soak": render_soak,
        "engine-ab": lambda load: render_ab(load, _glob(results, "engine_ab_*.json")),
        "serve-ab": lambda load: render_ab(load, _glob(results, "serve_ab_*.json")),
    }


def render(marker: str, results: Path) -> str:
    """The markdown for one marker, read from the JSON files in ``results``."""

    def load(name: str) -> dict:
        path = results / name
        if not path.is_file():
            raise MissingResults(
                f"{path} not found: the benchmarks page reads its tables from {RESULTS}/ "
                "(`python -m benchmarks <stage>` writes them)"
            )
        return json.loads(path.read_text())

    table_of = renderers(results)
    if marker not in table_of:
        raise MissingResults(f"unknown benchmark marker <!-- bench:{marker} -->: known are {', '.join(table_of)}")
    return table_of[marker](load).rstrip() + "\n"


def render_page(markdown: str, results: Path) -> str:
    return MARKER.sub(lambda m: render(m.group(1), results), markdown)


# --- the MkDocs hook ----------------------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    results = Path(config["config_file_path"]).resolve().parent / RESULTS
    try:
        return render_page(markdown, results)
    except MissingResults as err:
        raise PluginError(f"docs/hooks/benchmark_tables.py: {err}") from err


if __name__ == "__main__":
    results_dir = REPO / RESULTS
    text = (REPO / "docs" / PAGE).read_text()
    wanted = sys.argv[1:] or MARKER.findall(text)
    for name in wanted:
        print(f"<!-- bench:{name} -->\n{render(name, results_dir)}")
