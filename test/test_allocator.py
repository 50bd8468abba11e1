"""The training allocator policy (:func:`ecmnet_core.allocator.keep_freed_memory`): a freed large buffer stays in the
process and the next one of its size reuses it (no fresh page faults). Run in a child process: the policy is
process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ecmnet_core.allocator import libc

CHILD = r"""
import resource, sys
import torch
from ecmnet_core.allocator import keep_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

if sys.argv[1] == "keep":
    assert keep_freed_memory()
MIB = 2**20 // 4
def step():  # a training step's pattern: the same large buffers (above glibc's 32 MiB mmap ceiling) each time
    x = torch.ones(64 * MIB)
    y = x * 2
    z = torch.ones(40 * MIB) + y[: 40 * MIB]
    return float(z[0])
step()
before = faults()
for _ in range(8):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(libc() is None or not hasattr(libc(), "mallopt"), reason="needs glibc")
def test_freed_buffers_are_reused_without_page_faults():
    def refaults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip().splitlines()[-1])

    pages = 8 * (64 + 64 + 40 + 40) * 2**20 // 4096
    assert refaults("glibc") > pages * 0.9  # mmapped afresh each time: every page faults in again
    assert refaults("keep") < pages * 0.25  # the freed heap memory is reused (glibc splits a block now and then)
