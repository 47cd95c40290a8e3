"""Shared fixtures: the real config composed from conf/, and a tiny "pretrained" GPT-2 made here.

Nothing is fetched from the Hugging Face hub or W&B: a tiny GPT-2 and its tokenizer are built
and saved with ``save_pretrained`` into a temp dir, and stand in for ``gpt2``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.paths import ENGLISH, REPO
from helpers.tiny import TINY_MODEL, TINY_TRAIN

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


@pytest.fixture(scope="session", autouse=True)
def repo_reports_untouched():
    """No test may write the repository's own reports/ (DVC outputs and benchmark results): tests write to temp dirs."""
    before = _files_under(REPO / "reports")
    yield
    after = _files_under(REPO / "reports")
    changed = sorted(str(p.relative_to(REPO)) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"tests wrote the repository's reports (give them paths.reports in a temp dir): {changed}"


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 (model + byte-level BPE tokenizer) saved with save_pretrained: our offline 'gpt2'."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from penwright.prepare.tokenizer import train_bpe

    torch.manual_seed(0)  # the same tiny model in every session
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = train_bpe([ENGLISH * 4], vocab_size=320, min_frequency=2)
    tokenizer.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture
def compose_prepare(tmp_path, tiny_gpt2):
    """``compose_prepare(corpus, *overrides)``: the real composed config, pointed at ``corpus``.

    Uses the tiny pretrained tokenizer unless the overrides pick another model.
    """
    from penwright.core.config import compose

    def _compose(corpus: Path, *overrides: str, out_dir: Path | None = None):
        base = [
            f"data.path={corpus}",
            f"data.out_dir={out_dir or tmp_path / 'prepared'}",
            "model=gpt2",
            f"model.name_or_path={tiny_gpt2}",
        ]
        return compose(base + list(overrides), config_dir=REPO / "conf")

    return _compose


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory, tiny_gpt2) -> Path:
    """A prepared corpus (8 short documents, the tiny tokenizer): what the train stage reads."""
    from penwright.core.config import compose
    from penwright.prepare.stage import prepare

    root = tmp_path_factory.mktemp("prepared-tiny")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"Chapter {i}.\n" + ENGLISH * (2 + i % 3))
    out = root / "prepared"
    prepare(
        compose(
            [
                f"data.path={corpus}",
                f"data.out_dir={out}",
                "data.val_fraction=0.25",
                "model=gpt2",
                f"model.name_or_path={tiny_gpt2}",
            ],
            config_dir=REPO / "conf",
        )
    )
    return out


@pytest.fixture
def compose_train(tmp_path, prepared_tiny):
    """``compose_train(*overrides, run="run")``: the real config for a seconds-long training run in tmp_path/run.

    A 1-layer scratch model unless the overrides pick a model group (e.g. ``model=gpt2``).
    """
    from penwright.core.config import compose

    def _compose(*overrides: str, run: str = "run"):
        base = tmp_path / run
        model = [] if any(o.startswith("model=") for o in overrides) else TINY_MODEL
        return compose(
            [
                f"data.out_dir={prepared_tiny}",
                f"train.ckpt_dir={base}/ckpt",
                f"train.out_dir={base}/model",
                f"paths.reports={base}/reports",
                *model,
                *TINY_TRAIN,
                *overrides,
            ],
            config_dir=REPO / "conf",
        )

    return _compose


@pytest.fixture(scope="session")
def onnx_tiny(tmp_path_factory, tiny_gpt2) -> Path:
    """The tiny GPT-2 exported by the export stage (parity-checked): a folder Engine.load reads."""
    from penwright.core.config import compose
    from penwright.export.stage import export

    root = tmp_path_factory.mktemp("onnx-tiny")
    export(
        compose(
            [
                f"train.out_dir={tiny_gpt2}",
                f"export.out_dir={root / 'onnx'}",
                f"paths.reports={root / 'reports'}",
                "export.parity_prompts=[It is,The quick brown fox jumps,A]",
                "export.parity_new_tokens=8",
            ],
            config_dir=REPO / "conf",
        )
    )
    return root / "onnx"


class RunningServer:
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread of the test process."""

    def __init__(self, cfg):
        import threading

        import uvicorn

        from penwright.serve import build_app

        self.app = build_app(cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        from benchmarks.common import wait_until_healthy

        wait_until_healthy(self.url, 60)

    @property
    def engine(self):
        served = self.app.state.penwright
        return served.engines[served.default]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def serve_tiny(onnx_tiny):
    """``serve_tiny(*overrides)``: a running server on the tiny exported model (one per set of overrides)."""
    from penwright.core.config import compose

    servers: dict = {}

    def _serve(*overrides: str) -> RunningServer:
        if overrides not in servers:
            servers[overrides] = RunningServer(
                compose([f"serve.model_dir={onnx_tiny}", *overrides], config_dir=REPO / "conf")
            )
        return servers[overrides]

    yield _serve
    for server in servers.values():
        server.stop()


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30  # seconds a page may take to load or to finish generating


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium driven by the system chromedriver (Selenium Manager never downloads anything)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # (every request)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()
