"""``train.keep_freed_memory``: glibc then serves a step's large tensors from memory it keeps, rather than mapping
fresh pages for each; what is trained stays exactly the same."""

from __future__ import annotations

import subprocess
import sys

import torch

from helpers.train_outputs import curve, weights
from penwright.train.stage import train

HEAP_OR_MAPPED = """
import ctypes, torch
from penwright.train.stage import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def mapped_while_held():  # bytes glibc mmapped for an 8 MiB tensor while it is alive
    before = libc.mallinfo2().hblkhd
    t = torch.empty(8 << 20, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del t
    return grown

print(mapped_while_held() >= 8 << 20, keep_freed_memory(), mapped_while_held())
"""


def test_large_tensors_come_from_kept_memory_once_asked():
    out = subprocess.run([sys.executable, "-c", HEAP_OR_MAPPED], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "0"], out  # mapped by default; from the heap once asked


def test_training_is_the_same_with_kept_memory(compose_train, tmp_path):
    train(compose_train("trainer.max_steps=6", run="usual"))
    train(compose_train("trainer.max_steps=6", "train.keep_freed_memory=true", run="kept"))
    assert curve(tmp_path / "kept" / "reports") == curve(tmp_path / "usual" / "reports")
    a, b = weights(tmp_path / "usual" / "model"), weights(tmp_path / "kept" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
