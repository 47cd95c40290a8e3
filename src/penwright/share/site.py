"""``penwright site``: the exported model as a static web page that generates in the browser, with no server.

The folder (``site.out_dir``, ``artifacts/site`` by default) holds the page (the served page's own HTML, in its
site mode), ``penwright-web.mjs`` (generation on onnxruntime-web), the runtime files copied from the pinned npm
packages in ``site.web_dir`` (``npm ci --ignore-scripts`` there when they are missing), the graph (8-bit by
default), the tokenizer and config, and ``site.json``: the graph's name, size and sha256 (the page refuses a
graph that does not match) and the sha256 of the export's ``model.onnx`` it was built from (``check`` compares a
site with the export beside it). Nothing is fetched from anywhere else when it runs. The copy index and the
training text never go into it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from penwright.core import schema
from penwright.core.atomic import staged_dir
from penwright.core.chat_format import ChatFormat
from penwright.core.copy_index import md5_of
from penwright.core.errors import PenwrightError
from penwright.core.log import get_logger

log = get_logger("site").info
warn = get_logger("site").warning

GRAPHS = {"int8": "model.int8.onnx", "q8": "model.q8.onnx", "q4": "model.q4.onnx", "fp32": "model.onnx"}
RUNTIME = {  # file in the site <- file in <web_dir>/node_modules
    "ort.wasm.bundle.min.mjs": "onnxruntime-web/dist/ort.wasm.bundle.min.mjs",
    "ort-wasm-simd-threaded.wasm": "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm",
    "tokenizers.min.mjs": "@huggingface/tokenizers/dist/tokenizers.min.mjs",
    "jinja.mjs": "@huggingface/jinja/dist/index.js",
}
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")
MAX_GRAPH_BYTES = 2 * 10**9  # a browser tab cannot hold an ONNX buffer past ~2 GB (protobuf's limit too)
MIN_NODE = 20  # (what the site is built and tested with here: Debian's nodejs 20)
HERE = Path(__file__).parent
PAGE = HERE.parent / "serve" / "page.html"
# Hosts that read a _headers file (Netlify, Cloudflare Pages) send these: cross-origin isolation, so threads
HEADERS = "/*\n  Cross-Origin-Opener-Policy: same-origin\n  Cross-Origin-Embedder-Policy: require-corp\n"


def sha256_of(path: Path) -> str:
    return md5_of(path, "sha256")


def node_modules(web_dir: Path) -> Path:
    """``web_dir/node_modules`` with the lockfile's packages: installed with ``npm ci --ignore-scripts`` when a
    runtime file is missing; a clear line when Node.js or npm is missing or too old."""
    modules = web_dir / "node_modules"
    if all((modules / src).is_file() for src in RUNTIME.values()):
        return modules
    if not (web_dir / "package-lock.json").is_file():
        raise PenwrightError(f"site.web_dir={web_dir}: no package-lock.json here (penwright's web/ folder)")
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise PenwrightError(
            f"{'node' if not node else 'npm'} not found: the site copies its runtime from npm packages. "
            f"Install Node.js >= {MIN_NODE} and npm (Debian/Ubuntu: `apt-get install nodejs npm`), then rerun"
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major = int(m.group(1)) if (m := re.match(r"v(\d+)", version)) else 0
    if major < MIN_NODE:
        raise PenwrightError(f"Node.js {version or '(unknown)'}: the site's npm packages need Node.js >= {MIN_NODE}")
    log(f"installing the pinned npm packages in {web_dir} (npm ci --ignore-scripts)")
    done = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=web_dir, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise PenwrightError(f"npm ci in {web_dir} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    missing = [src for src in RUNTIME.values() if not (modules / src).is_file()]
    if missing:
        raise PenwrightError(f"{modules}: npm ci wrote no {missing[0]}: is {web_dir}/package.json penwright's?")
    return modules


def render_page(model_dir: Path, name: str, max_tokens: int) -> str:
    """The served page (serve/page.html) in its site mode: generation in the page, no key, no copy marks."""
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    persona = ChatFormat.parse(template)
    chat = {"persona": persona.persona if persona else "assistant"} if template else None
    return (
        PAGE.read_text(encoding="utf-8")
        .replace("{{model}}", name)
        .replace("{{max_tokens}}", str(max_tokens))
        .replace("{{auth}}", "false")
        .replace("{{chat}}", json.dumps(chat).replace("<", "\\u003c"))
        .replace("{{copies}}", "false")
        .replace("{{site}}", "true")
        .replace("{{where}}", "It runs in your browser, nothing leaves it.")
    )


def site(cfg: schema.Config) -> dict:
    """Build the site; returns what it wrote to ``site.json``."""
    s = cfg.site
    model_dir, out = Path(s.model_dir), Path(s.out_dir)
    source = model_dir / GRAPHS["fp32"]
    if not source.is_file():
        raise PenwrightError(f"{source}: no exported graph here (site.model_dir); run `penwright export` first")
    graph = model_dir / GRAPHS[s.graph]
    quantize_here = not graph.is_file()  # export.quantize did not list it: the site makes it (the same function)
    size = graph.stat().st_size if graph.is_file() else source.stat().st_size // (7 if s.graph == "q4" else 3)
    size += sum(p.stat().st_size for p in model_dir.glob(f"{graph.name}.data"))
    if size > MAX_GRAPH_BYTES:
        raise PenwrightError(
            f"{graph}: {size / 1e9:.1f} GB, too large for a browser tab (about 2 GB at most): build the site from "
            "the 8- or 4-bit graph (site.graph=int8, q8 or q4)"
        )
    for name in MODEL_FILES[:3]:
        if not (model_dir / name).is_file():
            raise PenwrightError(f"{model_dir / name}: missing; is {model_dir} a penwright export?")
    modules = node_modules(Path(s.web_dir))
    export_sha256 = sha256_of(source)
    if (out / "site.json").is_file():  # a site already there: say when it came from another export
        before = json.loads((out / "site.json").read_text()).get("export_sha256")
        if before and before != export_sha256:
            log(f"{out}: built from another export than {model_dir}; replacing it")
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    chat = ChatFormat.parse(tokenizer_config.get("chat_template"))
    if chat:
        warn(
            f"a chat model (persona {chat.persona!r}): whoever opens the site can make it say what it learned from "
            "the chats. The site holds no samples and no training text"
        )
    with staged_dir(out) as tmp:
        if quantize_here:
            from penwright.export.quantize import quantize_blocks, quantize_int8

            log(f"{graph}: not exported (export.quantize); quantizing {source.name} for the site")
            if s.graph == "int8":
                quantize_int8(source, tmp / graph.name)
            else:
                quantize_blocks(source, tmp / graph.name, 8 if s.graph == "q8" else 4)
        else:
            shutil.copyfile(graph, tmp / graph.name)
        info: dict[str, Any] = {
            "format": 1,
            "graph": graph.name,
            "graph_bytes": (tmp / graph.name).stat().st_size,
            "sha256": sha256_of(tmp / graph.name),
            "export_sha256": export_sha256,
            "max_threads": s.max_threads,
            "model": model_name(model_dir),
        }
        for name, src in RUNTIME.items():
            shutil.copyfile(modules / src, tmp / name)
        shutil.copyfile(HERE / "penwright-web.mjs", tmp / "penwright-web.mjs")
        for name in MODEL_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        page = render_page(model_dir, info["model"], min(s.max_tokens, _context(model_dir) - 1))
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "_headers").write_text(HEADERS)
        (tmp / "site.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    log(
        f"wrote {out}/: {graph.name} ({info['graph_bytes'] / 2**20:.1f} MiB), {size / 2**20:.1f} MiB in all. "
        f"Try it: `python -m http.server -d {out} -b 127.0.0.1 8000`, then open http://127.0.0.1:8000/"
    )
    return info


def model_name(model_dir: Path) -> str:
    """The model's name: its card's title (export writes README.md), else the folder's name."""
    card = model_dir / "README.md"
    if card.is_file():
        for line in card.read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return model_dir.name


def _context(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["n_positions"])


def check(site_dir: Path, model_dir: Path) -> None:
    """Refuse a site that was not built from the export in ``model_dir`` (or whose graph was changed since)."""
    path = site_dir / "site.json"
    if not path.is_file():
        raise PenwrightError(f"{site_dir}: no site.json here; build the site with `penwright site`")
    info = json.loads(path.read_text())
    if sha256_of(site_dir / info["graph"]) != info["sha256"]:
        raise PenwrightError(
            f"{site_dir / info['graph']}: changed since the site was built; rebuild it (penwright site)"
        )
    source = model_dir / GRAPHS["fp32"]
    if source.is_file() and info.get("export_sha256") != sha256_of(source):
        raise PenwrightError(f"{site_dir} was built from another export than {model_dir}: rebuild it (penwright site)")


def static_server(folder: Path, isolated: bool = True, port: int = 0):
    """A static server of ``folder`` on 127.0.0.1 in a thread, as a host serves the site; ``isolated``: with the
    cross-origin isolation headers that let the page use threads. Returns the server (``server_address``,
    ``paths``: every path asked for, ``shutdown()``)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    paths: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {
            **SimpleHTTPRequestHandler.extensions_map,
            ".mjs": "text/javascript",
            ".wasm": "application/wasm",
        }

        def end_headers(self):
            if isolated:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

        def do_GET(self):
            paths.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(folder)))
    server.paths = paths  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
