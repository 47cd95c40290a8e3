"""``penwright <command> [key=value ...]``: every stage from the command line.

Stage commands compose ``conf/`` with Hydra overrides (``penwright prepare data.val_fraction=0.1``),
or, with ``--params params.yaml``, run on the file ``dvc exp run`` composed (what dvc.yaml does).
"""

from __future__ import annotations

import argparse
import os
import sys

from penwright.core.errors import ConfigError, PenwrightError

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
    p = sub.add_parser("bench", help="measure a stage; writes reports/bench_<stage>.json")
    p.add_argument("stage", choices=["prepare", "train", "generate", "serve"])
    p.add_argument("--size-mb", type=int, default=200, help="prepare: size of the generated large corpus")
    p.add_argument("--steps", type=int, default=30, help="train: timed steps per run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train: Hydra overrides of the benchmarked config")
    p.add_argument("--output", default=None, help="default: reports/bench_<stage>.json")
    p.add_argument(
        "--lora",
        action="store_true",
        help="train: full finetuning vs LoRA on GPT-2-124M and gpt2-medium shapes (~12 min), the report's lora section",
    )
    p.add_argument(
        "--llama-cpp",
        default=".llama.cpp/bin",
        metavar="DIR",
        help="generate: llama.cpp's llama-bench and llama-batched-bench (scripts/build_llama_cpp.sh)",
    )
    p.add_argument("--without-llama-cpp", action="store_true", help="generate: leave the llama.cpp comparison out")
    p.add_argument(
        "--llama-server",
        action="store_true",
        help="serve: against llama.cpp's llama-server (in --llama-cpp) on the same weights, fp32 and q8 (~7 min on 2 cores), "
        "the report's llama_server section",
    )
    p.add_argument(
        "--repetitions", type=int, default=3, help="serve --llama-server: rounds at each level, medians (default 3)"
    )
    p.add_argument(
        "--models",
        help="serve --llama-server: quickstart, gpt2-124m-shape or both (comma-separated; default both); "
        "the others keep their last measurement in the report",
    )
    p.add_argument("--precisions", help="serve --llama-server: fp32, q8 or both (comma-separated; default both)")
    p.add_argument(
        "--only-llama-cpp",
        action="store_true",
        help="generate: only the llama.cpp comparison (~10 min), replacing that section of the report",
    )
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
    from penwright.bench.gpu import check_gpu

    check_gpu(args.output or ("reports/gpu/dry" if args.dry else "reports/gpu"), dry=args.dry)


def bench(args) -> None:
    from penwright import bench

    if args.stage == "prepare":
        bench.bench_prepare(size_mb=args.size_mb, output=args.output)
    elif args.stage == "train" and args.lora:
        bench.bench_lora(output=args.output)
    elif args.stage == "train":
        bench.bench_train(steps=args.steps, output=args.output, overrides=args.overrides)
    elif args.stage == "serve" and args.llama_server:
        from penwright.bench.serve import LLAMA_PRECISIONS, MODELS

        if args.repetitions < 1:
            raise ConfigError(f"--repetitions {args.repetitions}: give at least 1 (the medians of that many rounds)")
        bench.bench_serve_llama(
            output=args.output,
            llama_cpp=args.llama_cpp,
            repetitions=args.repetitions,
            models=_names(args.models, "--models", MODELS),
            precisions=_names(args.precisions, "--precisions", tuple(p for p, _, _ in LLAMA_PRECISIONS)),
        )
    elif args.stage == "serve":
        bench.bench_serve(output=args.output)
    else:
        bench.bench_generate(
            output=args.output,
            llama_cpp=None if args.without_llama_cpp else args.llama_cpp,
            only_llama_cpp=args.only_llama_cpp,
        )


def _names(value: str | None, flag: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of some of ``choices`` (None: all of them); anything else is refused, naming the flag
    and the choices."""
    if value is None:
        return choices
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))  # each once, in order
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ConfigError(f"{flag} {value!r}: choose from {', '.join(choices)} (comma-separated)")
    return names


def score(args) -> None:
    from penwright.generate.score import DELIMITER, score_file

    delimiter = DELIMITER if args.delimiter is None else args.delimiter.encode().decode("unicode_escape")
    score_file(args.file, args.model_dir, args.graph, delimiter, args.output)


TOOLS = {
    "params": params,
    "corpus": corpus,
    "check": check,
    "bench": bench,
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
    try:
        code = run(argv)
    except PenwrightError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
