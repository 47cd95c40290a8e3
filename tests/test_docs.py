"""The docs site: `mkdocs build --strict` passes, every page is in the nav, the benchmark tables are rendered from
benchmarks/results/, the commands the pages show compose; README.md stays a front door whose links resolve."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.markdown import blocks, cli_verbs, commands, penwright_commands, relative_links
from helpers.paths import REPO

MKDOCS = Path(sys.executable).parent / "mkdocs"
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
README_MAX_LINES = 250
OVERRIDE_VERBS = {"prepare", "train", "export", "generate", "verbosify", "chain", "serve", "show", "params"}


def mkdocs_config() -> dict:
    # mkdocs.yml uses no YAML tags, so the plain loader reads it
    return yaml.safe_load((REPO / "mkdocs.yml").read_text())


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"`mkdocs build --strict` fails:\n{done.stdout}{done.stderr}"
    return out


def page_text(site: Path, name: str) -> str:
    """The built page's HTML, tags dropped and entities decoded."""
    raw = (site / name / "index.html").read_text()
    return html.unescape(re.sub(r"<[^>]+>", " ", raw))


def test_mkdocs_build_strict_passes(site):
    assert (site / "index.html").is_file()
    assert not (site / "hooks").exists(), "docs/hooks/ is build code, not a page: exclude_docs must keep it out"


def test_mkdocs_yml_is_material_on_docs():
    cfg = mkdocs_config()
    assert cfg["theme"]["name"] == "material" and cfg["docs_dir"] == "docs" and cfg["strict"] is True
    assert "docs/hooks/benchmark_tables.py" in cfg["hooks"]


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    nav = nav_pages(mkdocs_config()["nav"])
    pages = [str(p.relative_to(DOCS)) for p in doc_pages()]
    assert sorted(set(pages) - set(nav)) == [], "pages missing from nav in mkdocs.yml"
    assert sorted(set(nav) - set(pages)) == [], "nav entries with no page under docs/"
    assert len(nav) == len(set(nav)), "a page is listed twice in nav"


def _first_value(result: dict, *path: str):
    node = result
    for key in path:
        node = node[key] if key != "*" else next(iter(node.values()))
    return node


def test_benchmark_tables_are_rendered_from_the_result_files(site):
    page = page_text(site, "benchmarks")
    assert "bench:" not in page, "a <!-- bench:... --> marker was left unrendered"
    generate = json.loads((RESULTS / "bench_generate.json").read_text())
    serve = json.loads((RESULTS / "bench_serve.json").read_text())
    prepare = json.loads((RESULTS / "bench_prepare.json").read_text())
    figures = {
        "bench_generate.json: the first case's engine tokens/s": _first_value(
            generate, "cases", "*", "runtime", "tokens_per_sec"
        ),
        "bench_serve.json: the first model's batching tokens/s at its first level": _first_value(
            serve, "models", "*", "levels", "*", "batching", "tokens_per_sec"
        ),
        "bench_prepare.json: the sample corpus's MB/s": prepare["sample"]["mb_per_s"],
    }
    for what, value in figures.items():
        assert re.search(rf"(?<![\d.]){re.escape(str(value))}(?![\d.])", page), f"{what} ({value}) is not on the page"


def test_every_result_file_is_on_the_page_with_its_machine_and_date(site):
    page = page_text(site, "benchmarks")
    names = sorted(p.name for p in RESULTS.glob("*.json"))
    assert names, f"no result files in {RESULTS}"
    for name in names:
        assert f"benchmarks/results/{name}" in page, f"{name} has no table on the benchmarks page"
    lines = [line for line in page.splitlines() if "· measured on:" in line]
    assert len(lines) >= len(names)
    for line in lines:
        assert re.search(r"date not recorded|\d{4}-\d{2}-\d{2}", line), line


def test_the_hook_fails_the_build_without_the_result_files(tmp_path):
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import benchmark_tables
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    with pytest.raises(benchmark_tables.MissingResults, match="bench_generate.json not found"):
        benchmark_tables.render_page("<!-- bench:generate -->", tmp_path)
    with pytest.raises(benchmark_tables.MissingResults, match="unknown benchmark marker"):
        benchmark_tables.render_page("<!-- bench:nonesuch -->", RESULTS)


def test_pages_run_only_real_commands_and_their_overrides_compose():
    """Every `penwright <verb>` a page shows is a verb `penwright --help` lists, and its overrides compose."""
    from penwright.core.config import compose

    verbs = cli_verbs()
    checked = 0
    for path in [REPO / "README.md", *doc_pages()]:
        for argv in penwright_commands(path.read_text()):
            assert argv[0] in verbs, f"{path.name}: `penwright {argv[0]}` is not a penwright command"
            if argv[0] not in OVERRIDE_VERBS:
                continue
            params = argv[argv.index("--params") + 1] if "--params" in argv else None
            overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
            compose(overrides, params=REPO / params if params else None, config_dir=REPO / "conf")
            checked += 1
    assert checked > 20


def test_benchmark_commands_name_real_stages_and_flags():
    """`python -m benchmarks[.engine_ab|.serve_ab] ...` in the pages: a stage and flags the module's --help lists."""
    used: dict[str, list[list[str]]] = {}
    for path in doc_pages():
        for block in blocks(path.read_text(), "bash"):
            for argv in commands(block):
                if argv[:2] == ["python", "-m"] and argv[2].split(".")[0] == "benchmarks":
                    used.setdefault(argv[2], []).append(argv[3:])
    assert "benchmarks" in used, "the docs show no `python -m benchmarks <stage>` command"
    for module, calls in used.items():
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"`python -m {module} --help` fails:\n{done.stderr}"
        stages = re.search(r"\{([a-z,]+)\}", done.stdout) if module == "benchmarks" else None
        for args in calls:
            if stages:
                assert args and args[0] in stages.group(1).split(","), f"`python -m benchmarks {args}`: no such stage"
            for flag in (a for a in args if a.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", done.stdout), f"`python -m {module}` has no {flag}"


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move the detail into docs/"


def test_readme_relative_links_point_at_files():
    text = (REPO / "README.md").read_text()
    links = relative_links(text)
    assert any(link.startswith("docs/") for link in links), "README links into no docs page"
    for link in links:
        target = REPO / link.split("#", 1)[0]
        assert target.exists(), f"README.md links to {link}, which does not exist"
