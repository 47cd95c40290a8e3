"""Stage ``serve``: the exported model over HTTP (``penwright serve``), on the continuous-batching engine."""

from __future__ import annotations

import os
import signal

from penwright.core.log import get_logger
from penwright.core.schema import Config, Serve


def settings_from(s: Serve) -> Serve:
    """``serve`` as the app reads it: the default model named as ``serve.models``' first, the API key from
    ``PENWRIGHT_API_KEY`` when the config has none."""
    key = s.api_key or os.environ.get("PENWRIGHT_API_KEY") or None
    name = next(iter(s.models)) if s.models else s.model_name
    return s.model_copy(update={"model_name": name, "api_key": str(key) if key else None})


def build_app(cfg: Config):
    """The app for ``cfg.serve``: settings checked now, the engine loaded when the server starts."""
    from penwright.inference.engine import Engine
    from penwright.serve.app import create_app

    s = cfg.serve
    settings = settings_from(s)

    def load() -> dict[str, Engine]:
        engines = {}
        for name, folder in (s.models or {s.model_name: s.model_dir}).items():
            engines[name] = engine = Engine.load(
                folder,
                slots=s.max_sequences,
                threads=0 if s.threads == "auto" else s.threads,
                graph=s.graph,
                context=s.context,
                spin=s.spin,
            )
            get_logger("serve").info(
                f"{name}: {folder}/{s.graph}: {engine.slots} slots x {engine.context} tokens "
                f"({engine.cache_bytes() / 2**20:.0f} MiB of KV buffer at most)"
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
