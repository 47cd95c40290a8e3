"""Stage ``serve``: the exported model over HTTP (``penwright serve``), on the continuous-batching engine."""

from __future__ import annotations

import os
import signal

from penwright.core.log import get_logger
from penwright.core.schema import Config, Serve

# serve.threads=auto: a model with fewer parameters than this decodes several rows on one onnxruntime thread (a row
# alone on every core, a session of its own), a larger one everything on every core. Measured on 2 cores, 32 slots,
# streamed requests at 1, 4 and 16 clients, fresh servers taking turns, 10 starts each, two runs (docs/benchmarks.md,
# "A freshly started server"): on one thread the 1.15M quickstart's p95 first token came 12-38% sooner at 4 and 16
# clients, with 1.01-1.21x the tokens/s there (a step too short to split, while HTTP needs the other core); alone
# one thread had given 0.84-0.90x the tokens/s, hence the lone session. Random 2.8M (4x192, 4096 tokens) and 11.6M
# models got 0.8-0.9x and 0.7x the tokens/s at 16 clients on one thread: they keep every core.
ONE_THREAD_BELOW = 2_000_000


def settings_from(s: Serve) -> Serve:
    """``serve`` as the app reads it: the default model named as ``serve.models``' first, the API key from
    ``PENWRIGHT_API_KEY`` when the config has none."""
    key = s.api_key or os.environ.get("PENWRIGHT_API_KEY") or None
    name = next(iter(s.models)) if s.models else s.model_name
    return s.model_copy(update={"model_name": name, "api_key": str(key) if key else None})


def parameters_of(folder) -> int | None:
    """About how many parameters the model exported in ``folder`` has, from its config.json (GPT-2's blocks: 12 d^2
    a layer, plus the token and position embeddings; the head is tied); None when it cannot be read (loading the
    engine then says what is wrong with the folder)."""
    import json
    from pathlib import Path

    try:
        c = json.loads((Path(folder) / "config.json").read_bytes())
        d = int(c["n_embd"])
        return 12 * int(c["n_layer"]) * d * d + (int(c["vocab_size"]) + int(c["n_positions"])) * d
    except (OSError, ValueError, KeyError, TypeError):
        return None


def threads_for(threads: int | str, folder) -> tuple[int, int | None]:
    """onnxruntime's intra-op threads for ``serve.threads`` (0: one a core), and those of a step of one row (None:
    the same session): ``auto`` is one thread for a model under ``ONE_THREAD_BELOW`` parameters, with every core
    for a request alone (``Engine.load``'s ``lone_threads``), and every core for a larger one."""
    if threads != "auto":
        return int(threads), None
    params = parameters_of(folder)
    return (1, 0) if params is not None and params < ONE_THREAD_BELOW else (0, None)


def build_app(cfg: Config):
    """The app for ``cfg.serve``: settings checked now, the engine loaded when the server starts."""
    from penwright.inference.engine import Engine
    from penwright.serve.app import create_app

    s = cfg.serve
    settings = settings_from(s)

    def load() -> dict[str, Engine]:
        engines = {}
        for name, folder in (s.models or {s.model_name: s.model_dir}).items():
            threads, lone = threads_for(s.threads, folder)
            engines[name] = engine = Engine.load(
                folder,
                slots=s.max_sequences,
                threads=threads,
                graph=s.graph,
                context=s.context,
                spin=s.spin,
                lone_threads=lone,
            )
            get_logger("serve").info(
                f"{name}: {folder}/{s.graph}: {engine.slots} slots x {engine.context} tokens "
                f"({engine.cache_bytes() / 2**20:.0f} MiB of KV buffer at most), "
                + (
                    f"{threads} onnxruntime thread{'s' if threads > 1 else ''}"
                    if threads
                    else "onnxruntime on every core"
                )
                + (", every core for a request alone" if getattr(engine.runner, "lone_session", None) else "")
            )
        return engines

    return create_app(load, settings)


def serve(cfg: Config) -> None:
    """Load the engine (bad files and configs fail here, in one line), then serve until SIGINT/SIGTERM."""
    from penwright.serve.app import serve_forever

    s = cfg.serve
    app = build_app(cfg)
    engines = app.state.load()  # before the port opens: a missing or broken model is an error, not a 503 forever
    app.state.load = lambda: engines
    get_logger("serve").info(f"http://{s.host}:{s.port}/  (page)   POST /v1/completions   GET /health   Ctrl-C stops")
    # uvicorn stops on SIGTERM (letting in-flight responses finish), then re-raises the signal with the handler
    # it found: a no-op one, so a requested stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    serve_forever(app, s.host, s.port, graceful=s.request_timeout)
    get_logger("serve").info("stopped")
