"""``train.keep_freed_memory``: glibc then keeps the memory a step frees, serving the next step's large tensors
from it rather than mapping fresh pages; what is trained stays exactly the same. Each side runs in a fresh
process: glibc's settings hold for a whole process."""

from __future__ import annotations

import multiprocessing
import platform
import subprocess
import sys

import pytest
import torch

from helpers.train_outputs import curve, weights
from penwright.train.stage import train

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt: Linux only"
)

PROBE = """
import ctypes, sys, torch
from penwright.train.stage import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(2):  # a step's 8 MiB tensors, allocated and freed: glibc's own threshold rises to them
    t = torch.empty(8 << 20, dtype=torch.uint8)
    del t
before = libc.mallinfo2().hblkhd
t = torch.empty(24 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - before >= 24 << 20  # a block of its own, unmapped when freed
del t
print(kept, mapped, libc.mallinfo2().fordblks >= 24 << 20)  # freed, still the heap's
"""


@glibc
@pytest.mark.parametrize("way, expected", [("usual", ["False", "True", "False"]), ("keep", ["True", "False", "True"])])
def test_a_large_tensor_comes_from_memory_kept_in_the_heap_only_when_asked(way, expected):
    out = subprocess.run([sys.executable, "-c", PROBE, way], capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected, out


def _train_apart(cfg) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(train, (cfg,))


@glibc
def test_training_is_bit_identical_with_kept_memory(compose_train, tmp_path):
    _train_apart(compose_train("trainer.max_steps=6", "train.keep_freed_memory=false", run="usual"))
    _train_apart(compose_train("trainer.max_steps=6", "train.keep_freed_memory=true", run="kept"))
    assert curve(tmp_path / "kept" / "reports") == curve(tmp_path / "usual" / "reports")
    a, b = weights(tmp_path / "usual" / "model"), weights(tmp_path / "kept" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
