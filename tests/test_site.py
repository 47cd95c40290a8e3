"""``penwright site``: the static page generates in real headless Chromium, on onnxruntime-web, exactly the text
``penwright generate`` gives from the same graph file (greedy, fp32 and 8-bit, one thread and several); the link
carries the settings; nothing is asked of any host but the site's; a tampered graph, another export, a graph too
large for a browser and a missing Node.js each stop with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from conftest import WAIT_S

from helpers.paths import REPO
from penwright.core.config import compose
from penwright.core.errors import PenwrightError
from penwright.share.site import check, site, static_server

PROMPTS = ["The quick brown fox", "", "Numbers like 12,345 — and “quotes”"]
TOKENS = 24


@pytest.fixture(scope="module")
def export_q8(tmp_path_factory, tiny_gpt2, prepared_tiny) -> Path:
    """The tiny GPT-2 exported with its 8-bit graphs (model.int8.onnx, model.q8.onnx) beside the fp32 one."""
    from penwright.export.stage import export

    root = tmp_path_factory.mktemp("site-export")
    export(
        compose(
            [
                f"train.out_dir={tiny_gpt2}",
                f"export.out_dir={root / 'onnx'}",
                f"paths.reports={root / 'reports'}",
                f"data.out_dir={prepared_tiny}",  # (the 8-bit graph is measured on its val windows)
                "export.quantize=[int8,q8]",
                "export.gguf=[]",
                "export.parity_prompts=[It is,The quick brown fox]",
                "export.parity_new_tokens=4",
            ],
            config_dir=REPO / "conf",
        )
    )
    return root / "onnx"


def build(model_dir: Path, out: Path, graph: str) -> dict:
    return site(
        compose(
            [
                f"site.model_dir={model_dir}",
                f"site.out_dir={out}",
                f"site.graph={graph}",
                f"site.web_dir={REPO / 'web'}",
            ],
            config_dir=REPO / "conf",
        )
    )


def python_greedy(model_dir: Path, graph: str, prompts: list[str], tmp: Path) -> list[str]:
    """What ``penwright generate`` writes for the prompts, greedy, from the graph file (the prompt left out)."""
    from penwright.generate.stage import generate

    cfg = compose(
        [
            f"generate.model_dir={model_dir}",
            f"generate.graph={graph}",
            f"generate.prompts={json.dumps(prompts, ensure_ascii=False)}",
            "generate.do_sample=false",
            "generate.nsamples=1",
            f"generate.max_new_tokens={TOKENS}",
            "generate.threads=1",
            "generate.include_prefix=false",
            f"paths.reports={tmp}",
            f"data.out_dir={tmp / 'no-prepared'}",
        ],
        config_dir=REPO / "conf",
    )
    return [s.text for s in generate(cfg)]


def run_page(driver, url: str) -> dict:
    """Open the site at ``url`` (its query runs it) and wait for the run's end: #status, #generated and the
    engine's own record (window.penwrightLast)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve_page import text_of

    driver.get_log("performance")  # (what earlier pages asked for)
    driver.get(url)

    def finished(d):
        status = text_of(d.find_element(By.ID, "status"))
        return status if status.startswith(("done", "error")) else False

    status = WebDriverWait(driver, WAIT_S * 2).until(finished, message=f"{url} did not finish generating")
    generated = driver.find_elements(By.ID, "generated")
    return {
        "status": status,
        "text": text_of(generated[0]) if generated else "",
        "last": driver.execute_script("return window.penwrightLast || null"),
        "requests": [
            json.loads(e["message"])["message"]["params"]["request"]["url"]
            for e in driver.get_log("performance")
            if '"Network.requestWillBeSent"' in e["message"]
        ],
        "errors": [e for e in driver.get_log("browser") if e["level"] == "SEVERE"],
    }


def link(base: str, prompt: str, **settings) -> str:
    query = "&".join(f"{k}={quote(str(v))}" for k, v in {"prompt": prompt, **settings}.items())
    return f"{base}/index.html?{query}&run=1"


@pytest.mark.parametrize("graph", ["fp32", "int8", "q8"])
def test_the_site_generates_what_penwright_generate_gives_from_the_same_graph(graph, export_q8, browser, tmp_path):
    info = build(export_q8, tmp_path / "site", graph)
    names = sorted(p.name for p in (tmp_path / "site").iterdir())
    assert info["graph"] in names and "index.html" in names and not any(n.endswith((".bin", ".md")) for n in names)
    expected = python_greedy(export_q8, info["graph"], PROMPTS, tmp_path)
    for isolated in (False, True):  # one thread (any host), then threads (cross-origin isolated)
        server = static_server(tmp_path / "site", isolated=isolated)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            for prompt, want in zip(PROMPTS, expected):
                got = run_page(browser, link(base, prompt, max_tokens=TOKENS, temperature=0))
                assert got["status"].startswith("done"), got["status"]
                threads = (
                    1
                    if not isolated
                    else min(info["max_threads"], browser.execute_script("return navigator.hardwareConcurrency"))
                )
                assert f"on {threads} thread(s)" in got["status"]
                assert got["last"]["text"] == want and got["text"] == want, (prompt, graph, isolated)
                assert not got["errors"], got["errors"]
                foreign = [
                    u for u in got["requests"] if urlsplit(u)[:2] != ("http", f"127.0.0.1:{server.server_address[1]}")
                ]
                assert not foreign, f"the site asked another host: {foreign}"
        finally:
            server.shutdown()


def test_the_link_fills_the_controls_and_a_seed_gives_the_same_sample(export_q8, browser, tmp_path):
    from selenium.webdriver.common.by import By

    build(export_q8, tmp_path / "site", "fp32")
    server = static_server(tmp_path / "site", isolated=False)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        settings = {"max_tokens": 12, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 7}
        first = run_page(browser, link(base, "It is", **settings))
        for key, element in (
            ("max_tokens", "length"),
            ("temperature", "temperature"),
            ("top_k", "top_k"),
            ("top_p", "top_p"),
            ("seed", "seed"),
        ):
            assert browser.find_element(By.ID, element).get_attribute("value") == str(settings[key])
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "It is"
        again = run_page(browser, link(base, "It is", **settings))
        other = run_page(browser, link(base, "It is", **{**settings, "seed": 8}))
        assert first["text"] == again["text"] and len(first["last"]["tokens"]) <= 12
        assert other["text"] != first["text"]  # (12 tokens at temperature 0.9 from a random model: they differ)
        shared = browser.find_element(By.ID, "link").get_attribute("href")
        assert "seed=8" in shared and "prompt=It+is" in shared  # the link to what was just run
    finally:
        server.shutdown()


def test_a_tampered_graph_another_export_and_bad_inputs_stop_in_one_line(export_q8, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from test_serve_page import text_of

    out = tmp_path / "site"
    info = build(export_q8, out, "q8")
    check(out, export_q8)  # built from this export: fine
    graph = out / info["graph"]
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(PenwrightError, match="changed since the site was built"):
        check(out, export_q8)
    server = static_server(out, isolated=False)
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, WAIT_S).until(lambda d: "error" in text_of(d.find_element(By.ID, "status")))
        status = text_of(browser.find_element(By.ID, "status"))
        assert "sha256" in status and "penwright site" in status and not browser.find_element(By.ID, "go").is_enabled()
    finally:
        server.shutdown()

    other = tmp_path / "other"  # another export: the same files, another fp32 graph
    shutil.copytree(export_q8, other)
    (other / "model.onnx").write_bytes((other / "model.onnx").read_bytes() + b"\0")
    build(export_q8, out, "q8")
    with pytest.raises(PenwrightError, match="built from another export"):
        check(out, other)

    big = tmp_path / "big"
    shutil.copytree(export_q8, big)
    with open(big / "model.q8.onnx", "r+b") as f:
        f.truncate(2 * 10**9 + 1)  # (sparse: no disk used)
    with pytest.raises(PenwrightError, match=r"too large for a browser tab.*8- or 4-bit"):
        build(big, tmp_path / "big-site", "q8")
    assert not (tmp_path / "big-site").exists()
    (big / "model.q8.onnx").unlink()  # an export without its 8-bit graph: the site makes the same one
    assert build(big, tmp_path / "big-site", "q8")["sha256"] == info["sha256"]
    (big / "model.onnx").unlink()
    with pytest.raises(PenwrightError, match=r"no exported graph here.*penwright export"):
        build(big, tmp_path / "big-site", "q8")

    web = tmp_path / "web"  # no packages installed, and no Node.js on the PATH
    web.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(REPO / "web" / name, web / name)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(PenwrightError, match=r"not found.*apt-get install nodejs npm"):
        site(
            compose(
                [f"site.model_dir={export_q8}", f"site.out_dir={out}", f"site.web_dir={web}"], config_dir=REPO / "conf"
            )
        )
    assert json.loads((out / "site.json").read_text())["graph"] == "model.q8.onnx"  # the built site as it was
