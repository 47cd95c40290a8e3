"""The benchmarks: ``python -m benchmarks <stage>`` measures a stage side by side with its baseline ->
benchmarks/results/bench_<stage>.json (``__main__``); ``engine_ab`` and ``serve_ab`` compare two commits.

One module a benchmark (``prepare``, ``train``, ``generate``, ``serve``), each calling the stage's own
code; ``common`` holds what they share. The functions below are imported when first used: a child
process a benchmark starts (``common.run_child``) imports only its own module, so its peak RSS holds
nothing the other benchmarks import (torch, for one).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.generate import bench_generate
    from benchmarks.prepare import bench_prepare
    from benchmarks.serve import bench_serve, bench_serve_llama
    from benchmarks.train import bench_lora, bench_train

__all__ = ["bench_generate", "bench_lora", "bench_prepare", "bench_serve", "bench_serve_llama", "bench_train"]
MODULES = {"bench_lora": "train", "bench_serve_llama": "serve"}  # a benchmark that lives in another benchmark's module


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(f"benchmarks.{MODULES.get(name, name.removeprefix('bench_'))}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
