"""``penwright <command> [key=value ...]``: every stage from the command line.

Stage commands compose ``conf/`` with Hydra overrides (``penwright prepare data.val_fraction=0.1``),
or, with ``--params params.yaml``, run on the file ``dvc exp run`` composed (what dvc.yaml does).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from penwright.core.errors import PenwrightError

# Quiet and deterministic by default; a user's own setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


# The stages: command -> (module, function, help). Each function takes the composed, validated config.
STAGES = {
    "prepare": (
        "penwright.prepare.stage",
        "prepare",
        "corpus -> tokenizer + train/val token memmaps (artifacts/prepared)",
    ),
    "train": (
        "penwright.train.stage",
        "train",
        "prepared tokens -> a trained GPT-2 (artifacts/model), W&B logs, samples",
    ),
    "export": (
        "penwright.export.stage",
        "export",
        "trained model -> ONNX graph with a KV cache (artifacts/onnx), parity-checked",
    ),
    "generate": (
        "penwright.generate.stage",
        "generate",
        "text from the exported model (onnxruntime, KV cache): reports/samples.md",
    ),
    "chat": (
        "penwright.generate.chat",
        "chat",
        "talk with the exported chat model in the terminal, the reply streaming (no server)",
    ),
    "verbosify": (
        "penwright.generate.verbosify",
        "verbosify",
        "expand a document passage by passage (a model finetuned on each): reports/verbosify.md",
    ),
    "chain": (
        "penwright.generate.chain",
        "chain",
        "writing prompts: prompts from one model, each answered by another (experiment=wp_responses)",
    ),
    "site": (
        "penwright.share.site",
        "site",
        "the exported model as a static web page that generates in the browser, no server (artifacts/site)",
    ),
    "serve": (
        "penwright.serve",
        "serve",
        "the exported model over HTTP: OpenAI-compatible /v1/completions, a page at / (conf/serve/)",
    ),
    "show": ("penwright.cli", "show", "print the composed config (every key)"),
}


def _stage_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--params", metavar="FILE", help="run on this composed params file (dvc.yaml uses params.yaml)")
    p.add_argument("--config-dir", metavar="DIR", help="Hydra config directory (default: ./conf)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. data.val_fraction=0.1 model=gpt2"
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="penwright", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, _, help) in STAGES.items():
        _stage_parser(sub, name, help)
    p = sub.add_parser("params", help="compose conf/ into params.yaml, exactly as `dvc exp run` does")
    p.add_argument("--output", default="params.yaml")
    p.add_argument("--config-dir", metavar="DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("corpus", help="write the sample corpus (King James Bible) into data/ and the DVC cache")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--no-commit", action="store_true", help="do not record it in the DVC cache")
    p = sub.add_parser("check", help="check a machine: `check gpu` runs the train path on a GPU -> reports/gpu/")
    p.add_argument("what", choices=["gpu"])
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    p.add_argument("--output", default=None, help="default: reports/gpu (reports/gpu/dry with --dry)")
    p = sub.add_parser("score", help="rank samples by the model's own likelihood -> FILE.scores.jsonl, best first")
    p.add_argument("file", help="samples penwright generate wrote (.md text blocks, or plain text and --delimiter)")
    p.add_argument("--model-dir", default="artifacts/onnx", help="the exported folder (default: artifacts/onnx)")
    p.add_argument("--graph", default="model.onnx", help="the graph file in it (model.q8.onnx: the 8-bit one)")
    p.add_argument("--delimiter", default=None, help="between samples in plain text (default: generate's)")
    p.add_argument("--output", default=None, help="default: FILE.scores.jsonl")
    p.add_argument(
        "--prepared",
        default="artifacts/prepared",
        help="the prepared folder of the model's corpus: each sample's copy measures from its index ('' for none)",
    )
    p.add_argument("--copy-min-span", type=int, default=12, help="copy measures: the shortest copied span counted")
    p = sub.add_parser(
        "sweep", help="train many variants (conf/sweep/NAME.yaml): each a DVC experiment and a W&B run, ranked"
    )
    p.add_argument("name", help="a sweep in conf/sweep/ (its file name without .yaml), or a sweep file")
    p.add_argument(
        "--storage", help="optuna: the study's storage (a database URL, or a journal file every worker reaches)"
    )
    p.add_argument("--trials", type=int, help="optuna: trials in all, every worker together (default: the file's)")
    p.add_argument("--jobs", type=int, help="grid: experiments DVC's queue runs at once (default: the file's)")
    p.add_argument("--summary", action="store_true", help="run nothing: the table of the trials so far")
    return parser


def show(cfg) -> None:
    """Print the composed config, every key, as YAML."""
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")


def params(args) -> None:
    from penwright.core import config

    out = config.write_params(args.overrides, args.output, config_dir=args.config_dir)
    print(f"wrote {out}", file=sys.stderr)


def corpus(args) -> None:
    from penwright.prepare.kjv import materialize

    materialize(args.data_dir, commit=not args.no_commit)


def check(args) -> None:
    from penwright.gpu_check import check_gpu

    check_gpu(args.output or ("reports/gpu/dry" if args.dry else "reports/gpu"), dry=args.dry)


def score(args) -> None:
    from penwright.generate.score import DELIMITER, score_file

    delimiter = DELIMITER if args.delimiter is None else args.delimiter.encode().decode("unicode_escape")
    score_file(
        args.file,
        args.model_dir,
        args.graph,
        delimiter,
        args.output,
        prepared=args.prepared or None,
        min_span=args.copy_min_span,
    )


def sweep(args) -> None:
    from penwright.sweep.run import sweep as run_sweep

    run_sweep(args.name, storage=args.storage, trials=args.trials, jobs=args.jobs, summary=args.summary)


TOOLS = {
    "sweep": sweep,
    "params": params,
    "corpus": corpus,
    "check": check,
    "score": score,
}  # commands that are not stages


def run(argv: list[str] | None = None) -> int:
    import importlib

    args = build_parser().parse_args(argv)
    if args.command in STAGES:
        from penwright.core import config

        cfg = config.compose(args.overrides, params=args.params, config_dir=args.config_dir)
        module, function, _ = STAGES[args.command]
        getattr(importlib.import_module(module), function)(cfg)
    else:
        TOOLS[args.command](args)
    return 0


def main(argv: list[str] | None = None) -> None:
    exit_after(lambda: run(argv))


def exit_after(work: Callable[[], int | None]) -> NoReturn:
    """Run a command and exit with its code: bad input is one line (``error: ...``, exit 2), not a traceback."""
    try:
        code = work() or 0
    except PenwrightError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
