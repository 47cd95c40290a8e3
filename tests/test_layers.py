"""The package's layers import one way: each package of ``src/penwright`` may import only the ones below it.

``core`` is under everything; the stages follow the pipeline (corpus -> tokens -> model -> ONNX), and the
engine (``inference``) sits on ``core`` alone, so generation, the server and the export's parity check all
use it and it uses none of them (the graph rewrite it runs at load is its own, not the export's).
"""

from __future__ import annotations

import ast

import pytest

from helpers.paths import REPO

PACKAGE = REPO / "src" / "penwright"
ALLOWED = {  # package -> the penwright packages it may import
    "core": set(),
    "prepare": {"core"},
    "train": {"core", "prepare"},
    "inference": {"core"},
    "export": {"core", "prepare", "train", "inference"},
    "generate": {"core", "prepare", "inference"},
    "serve": {"core", "inference"},
    "share": {"core", "export"},  # the site: an export's graph (quantized when export did not), in a page
    "gpu_check": {"core", "train", "export", "inference"},
    "sweep": {"core"},  # trials are `dvc exp run`s of the stages: it imports none of them
    "cli": {"core", "prepare", "generate", "gpu_check", "sweep"},  # (the stages themselves it imports by name, lazily)
}


def imports_of(package: str) -> dict[str, set[str]]:
    """penwright package -> the files of ``package`` that import it (itself left out)."""
    files = sorted((PACKAGE / package).rglob("*.py")) if (PACKAGE / package).is_dir() else [PACKAGE / f"{package}.py"]
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                targets = [parts[1]] if parts[0] == "penwright" and len(parts) > 1 else []
                if node.module == "penwright":
                    targets = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("penwright.")]
            else:
                continue
            for t in targets:
                if t != package:
                    found.setdefault(t, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_package_has_a_place():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(ALLOWED), "add the new package to ALLOWED, below the ones it needs"


@pytest.mark.parametrize("package", list(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = {t: sorted(f) for t, f in imports_of(package).items() if t not in ALLOWED[package]}
    assert not wrong, f"penwright.{package} imports {wrong}: that import runs against the layers"
