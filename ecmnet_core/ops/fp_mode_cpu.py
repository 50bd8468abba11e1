"""Denormal floats flushed to zero on PyTorch's CPU threads (``csrc/fp_mode_cpu.cpp``).

Weight decay leaves trained weights denormal (the shipped CamVid model has 68,005, a third of the SS2D input and
output projections), and the products they feed are denormal too. Intel cores handle every denormal operand in
microcode: on a 2-core Xeon with AVX-512 and AMX the shipped model's forward took 166 ms instead of 137 ms with
those weights zeroed, and a matmul with half its inputs denormal ran 85x slower; AMD cores pay far less. Flushing
changes results only where a value is below 1.2e-38 in magnitude (the labels do not change).

``torch.set_flush_denormal`` sets the mode of the calling thread only, while oneDNN's convolutions and MKL's
matmuls run on PyTorch's OpenMP team, each thread with its own MXCSR. :func:`flush_denormals` sets it on the caller
and its team, once per (thread, thread count): the CPU engines call it before each forward and the trainer before
each step. It is process state: other float code on those threads also flushes (as with
``torch.set_flush_denormal(True)``); ``ECMNET_KEEP_DENORMALS=1`` turns it off. Built on first use and cached
(:mod:`ecmnet_core.ops.cbuild`, cache ``fp_mode_cpu``).
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from ecmnet_core.ops import cbuild

ABI_VERSION = 1
#: set to 1 to keep IEEE denormals (slower on Intel CPUs; results may differ below 1.2e-38)
KEEP_ENV = "ECMNET_KEEP_DENORMALS"

KERNEL = cbuild.Kernel("fp_mode_cpu", "ecmnet_fp_mode_abi_version", ABI_VERSION, {
    "ecmnet_flush_denormals": ([ctypes.c_int, ctypes.c_int], ctypes.c_int)},
    what="compiled CPU floating-point mode switch", extra_flags=("-fopenmp",))

load_library = KERNEL.load

_applied = threading.local()  # the thread count this thread's team was set for


def flush_denormals() -> bool:
    """Flush-to-zero and denormals-are-zero on the calling thread and its ``torch.get_num_threads()`` OpenMP
    threads. True when the mode is on; False where it cannot be set (no compiler, not x86) or ``ECMNET_KEEP_DENORMALS``
    is 1. Cheap after the first call on a thread (a thread-local check)."""
    threads = torch.get_num_threads()
    if getattr(_applied, "threads", None) == threads:
        return True
    if os.environ.get(KEEP_ENV) == "1":
        return False
    lib = load_library()
    if lib is None or lib.ecmnet_flush_denormals(1, threads) < 1:
        return False
    _applied.threads = threads
    return True


def keep_denormals() -> bool:
    """Undo :func:`flush_denormals` on the calling thread and its team (IEEE denormals again). True when done."""
    lib = load_library()
    _applied.threads = None
    return lib is not None and lib.ecmnet_flush_denormals(0, torch.get_num_threads()) >= 1


__all__ = ["ABI_VERSION", "KEEP_ENV", "KERNEL", "flush_denormals", "keep_denormals", "load_library"]
