"""``python -m benchmarks <stage>``: measure a stage side by side with its baseline -> benchmarks/results/.

Run from a checkout (the benchmarks are not part of the installed package) with the ``[bench]`` extra:
``pip install -c constraints.txt -e ".[bench]"``. ``python -m benchmarks --help`` lists the options.
"""

from __future__ import annotations

import argparse

from penwright.cli import exit_after
from penwright.core.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "stage",
        choices=["prepare", "train", "step", "generate", "serve", "copies", "site", "cold", "recipe", "soak"],
    )
    p.add_argument("--runs", type=int, default=1, help="recipe: runs of each recipe, in turns (default 1)")
    p.add_argument("--requests", type=int, default=10_000, help="soak: requests each server takes (default 10000)")
    p.add_argument("--starts", type=int, default=5, help="cold: fresh starts of each server (default 5)")
    p.add_argument("--size-mb", type=int, default=200, help="prepare: size of the generated large corpus")
    p.add_argument(
        "--sizes-mb",
        default="10,100,1000",
        help="copies: sizes of text (MB) to index, comma-separated (default 10,100,1000)",
    )
    p.add_argument("--steps", type=int, default=30, help="train, step: timed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="step: rounds of the three ways, in turns (default 3)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="train, step: Hydra overrides of the benchmarked config; recipe: the candidate recipe; cold: serve "
        "overrides for a third server in the turns (a variant beside the default)",
    )
    p.add_argument("--output", default=None, help="default: benchmarks/results/bench_<stage>.json")
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
        help="serve --llama-server, soak, cold: quickstart, gpt2-124m-shape or both (comma-separated; default both); "
        "the others keep their last measurement in the report",
    )
    p.add_argument("--precisions", help="serve --llama-server: fp32, q8 or both (comma-separated; default both)")
    p.add_argument(
        "--only-llama-cpp",
        action="store_true",
        help="generate: only the llama.cpp comparison (~10 min), replacing that section of the report",
    )

    return p


def run(args: argparse.Namespace) -> None:
    import benchmarks as bench

    if args.stage == "prepare":
        bench.bench_prepare(size_mb=args.size_mb, output=args.output)
    elif args.stage == "copies":
        from benchmarks.copies import bench_copies

        try:
            sizes = [int(s) for s in args.sizes_mb.split(",") if s.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"--sizes-mb {args.sizes_mb!r}: give sizes in MB, e.g. 10,100,1000")
        bench_copies(sizes_mb=sizes, output=args.output)
    elif args.stage == "cold":
        from benchmarks.cold_start import LEVELS, bench_cold

        if args.starts < 1:
            raise ConfigError(f"--starts {args.starts}: give at least 1")
        bench_cold(
            output=args.output,
            starts=args.starts,
            llama_cpp=args.llama_cpp,
            models=_names(args.models, "--models", tuple(LEVELS)),
            variant=tuple(args.overrides),
        )
    elif args.stage == "soak":
        from benchmarks.soak import bench_soak

        if args.requests < 1000:
            raise ConfigError(f"--requests {args.requests}: give at least 1000 (RSS is read every 1000)")
        from benchmarks.soak import MODELS as SOAK_MODELS

        bench_soak(output=args.output, requests=args.requests, models=_names(args.models, "--models", SOAK_MODELS))
    elif args.stage == "recipe":
        from benchmarks.recipe import bench_recipe

        if args.runs < 1:
            raise ConfigError(f"--runs {args.runs}: give at least 1")
        bench_recipe(args.overrides, runs=args.runs, output=args.output)
    elif args.stage == "step":
        from benchmarks.step import bench_step

        if args.rounds < 1 or args.steps < 1:
            raise ConfigError(f"--rounds {args.rounds} --steps {args.steps}: give at least 1 of each")
        bench_step(args.overrides, steps=args.steps, rounds=args.rounds, output=args.output)
    elif args.stage == "site":
        from benchmarks.site import bench_site

        bench_site(output=args.output)
    elif args.stage == "train" and args.lora:
        bench.bench_lora(output=args.output)
    elif args.stage == "train":
        bench.bench_train(steps=args.steps, output=args.output, overrides=args.overrides)
    elif args.stage == "serve" and args.llama_server:
        from benchmarks.serve import LLAMA_PRECISIONS, MODELS

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


def main(argv: list[str] | None = None) -> None:
    exit_after(lambda: run(build_parser().parse_args(argv)))  # bad input: one line, exit 2, as penwright's CLI


if __name__ == "__main__":
    main()
