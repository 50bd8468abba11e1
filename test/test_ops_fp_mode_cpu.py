"""Denormals flushed to zero on PyTorch's intra-op threads (``ecmnet_core.ops.fp_mode_cpu``), by the CPU engines
before a forward and the trainer before a step.

Each check runs on a fresh Python thread with its own OpenMP team, set to IEEE denormals first (a thread starts
with its creator's mode), so nothing leaks into other tests. A product of two normal floats that is denormal
(1e-20 * 1e-20 = 1e-40) shows the mode: 0 with flush-to-zero, 1e-40 without. The tensor is large enough that
PyTorch splits the multiply across both threads.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from ecmnet_core.ops import fp_mode_cpu

pytestmark = [pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MXCSR is x86's"),
              pytest.mark.skipif(not fp_mode_cpu.load_library(), reason="no C++ compiler for the CPU kernel")]

TINY = torch.full((1 << 20,), 1e-20)


def on_fresh_thread(body: Callable[[], object]) -> object:
    """``body()`` on a new thread with 2 intra-op threads; its result (or its exception, raised here)."""
    out: dict[str, object] = {}

    def run() -> None:
        saved = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            # a new thread starts with its creator's mode, which earlier tests' segmenters may have set
            assert fp_mode_cpu.keep_denormals()
            out["value"] = body()
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc
        finally:
            torch.set_num_threads(saved)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def zero_products() -> int:
    """How many of the 2**20 denormal products came out as zero."""
    return int(((TINY * TINY) == 0).sum())


def test_flush_reaches_every_intra_op_thread_and_can_be_undone():
    def body():
        before = zero_products()
        assert fp_mode_cpu.flush_denormals() and fp_mode_cpu.flush_denormals()  # the second call is a no-op
        flushed = zero_products()
        assert fp_mode_cpu.keep_denormals()
        return before, flushed, zero_products()

    before, flushed, after = on_fresh_thread(body)
    assert (before, flushed, after) == (0, TINY.numel(), 0)


def test_the_environment_keeps_denormals(monkeypatch):
    monkeypatch.setenv(fp_mode_cpu.KEEP_ENV, "1")
    assert on_fresh_thread(lambda: (fp_mode_cpu.flush_denormals(), zero_products())) == (False, 0)


@pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")
def test_a_cpu_segmenter_runs_its_forward_with_denormals_flushed_and_says_so():
    from ecmnet_core.inference import InferenceConfig, Segmenter

    def body():
        seg = Segmenter(InferenceConfig(model="baseline", device="cpu", input_size=(32, 48)))
        seg.segment(np.zeros((32, 48, 3), np.uint8))
        return zero_products(), seg.describe()["denormals"]

    assert on_fresh_thread(body) == (TINY.numel(), "flushed to zero")  # also in the node's /diagnostics
