"""README.md's quick commands run as it shows them: read from the README itself, so the test fails when it drifts.

The slow ones (`dvc repro`, training) are CI's first command already; here: `penwright --help` against the stage
table, `penwright show` with every override README shows, the error lines it quotes, and its two pictures against
the files they come from.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from helpers.markdown import PENWRIGHT, block_after, blocks, cli_verbs, penwright_commands
from helpers.paths import REPO

README = (REPO / "README.md").read_text()
# The verbs that take Hydra overrides (`penwright show` composes the same config they run on).
OVERRIDE_VERBS = {"prepare", "train", "export", "generate", "verbosify", "chain", "serve", "show"}


def penwright(*args: str, cwd=REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(PENWRIGHT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def stage_table_verbs() -> set[str]:
    """The `penwright <verb>` commands in the command column of README's stage table."""
    section = README.split("## The stages", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    column = header.index("command")
    return {verb for row in rows[2:] for verb in re.findall(r"`penwright ([a-z-]+)", row.strip("|").split("|")[column])}


def test_first_bash_block_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    expected = re.search(r"^expected='(.*?)'$", ci, re.M | re.S).group(1)
    assert blocks(README, "bash")[0].rstrip("\n") == expected


def test_help_lists_every_verb_of_the_stage_table():
    verbs = stage_table_verbs()
    assert {"prepare", "train", "export", "generate", "serve"} <= verbs, f"README's stage table: {sorted(verbs)}"
    missing = verbs - cli_verbs()
    assert not missing, f"README's stage table names commands `penwright --help` does not list: {sorted(missing)}"


def test_every_penwright_command_in_readme_is_a_real_verb():
    verbs = cli_verbs()
    used = {argv[0] for argv in penwright_commands(README)}
    assert used, "README shows no penwright command"
    assert used <= verbs, f"README runs commands that do not exist: {sorted(used - verbs)}"


def test_penwright_show_prints_the_composed_config():
    done = penwright("show")
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    for group in ("data", "model", "train", "trainer", "export", "generate", "serve"):
        assert isinstance(cfg.get(group), dict), f"`penwright show` has no {group} group"


def _lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"no key {dotted} in the composed config"
        node = node[part]
    return node


def _same(shown, written: str) -> bool:
    if isinstance(shown, bool):
        return str(shown).lower() == written.lower()
    if isinstance(shown, int | float):
        return float(shown) == float(written)
    if shown is None:
        return written == "null"
    if isinstance(shown, str):
        return shown == written
    return True  # a list or a mapping: composing without an error is the check


OVERRIDES = sorted(
    {tuple(argv[1:]) for argv in penwright_commands(README) if argv[0] in OVERRIDE_VERBS},
    key=lambda args: (len(args), args),
)


@pytest.mark.parametrize("overrides", OVERRIDES, ids=lambda o: " ".join(o) or "(none)")
def test_overrides_readme_shows_compose_to_what_they_say(overrides):
    """`penwright show <the overrides of a README command>` accepts them, and the config holds each value."""
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    done = penwright("show", *overrides)
    assert done.returncode == 0, f"`penwright show {shlex.join(overrides)}` fails:\n{done.stderr}"
    cfg = yaml.safe_load(done.stdout)
    for override in overrides:
        key, value = override.split("=", 1)
        if "." in key:  # a key (a group swap, `data=kjv_verses`, has no single value to compare)
            shown = _lookup(cfg, key)
            assert _same(shown, value), f"{override}: `penwright show` has {key}={shown!r}"


def _error_examples() -> list[tuple[list[str], list[str]]]:
    """`$ penwright ...` lines of README's text blocks, each with the lines it prints."""
    examples = []
    for block in blocks(README, "text"):
        current = None
        for line in block.splitlines():
            if line.startswith("$ "):
                current = (shlex.split(line[2:]), [])
                examples.append(current)
            elif current is not None:
                current[1].append(line)
    return examples


ERRORS = _error_examples()


def test_readme_shows_error_examples():
    assert ERRORS, "README's error examples are gone: update this test with it"


@pytest.mark.parametrize("argv, expected", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_error_examples_print_exactly_what_readme_shows(argv, expected, tmp_path):
    """Run in a temp dir on the repository's conf/, so nothing is written into the repository if it did not fail."""
    assert argv[0] == "penwright" and argv[1] in OVERRIDE_VERBS
    done = penwright(argv[1], "--config-dir", str(REPO / "conf"), *argv[2:], cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    assert (done.stdout + done.stderr).strip().splitlines() == expected


def written(path: str) -> list[str]:
    """The report at ``path`` as the pipeline last wrote it here, and as committed. Training is exact on one
    machine but not across CPUs (their kernels round differently), so a fresh clone's ``dvc repro`` on another
    machine may write other numbers and samples than the run the README shows, which is the committed one."""
    texts = [(REPO / path).read_text()]
    committed = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True)
    if committed.returncode == 0:
        texts.append(committed.stdout)
    return texts


def test_the_curve_is_the_one_in_reports():
    shown = [line.split() for line in block_after(README, "picture: reports/curves/val.tsv").splitlines()[1:]]
    curves = []
    for text in written("reports/curves/val.tsv"):
        rows = [line.split("\t") for line in text.splitlines()]
        header, rows = rows[0], rows[1:]
        step, loss, bpb = header.index("step"), header.index("loss"), header.index("bpb")
        curves.append([[r[step], f"{float(r[loss]):.2f}", f"{float(r[bpb]):.2f}"] for r in rows])
    assert shown in curves


def test_the_sample_is_one_generate_wrote():
    shown = " ".join(block_after(README, "picture: reports/samples.md").split())
    assert len(shown) > 100
    assert any(shown in " ".join(text.split()) for text in written("reports/samples.md"))
