"""Registering the compiled CPU inference kernels as ``torch.ops.ecmnet.*`` operators, cheaply.

``torch.library.custom_op`` wraps every call in autograd and schema-checking layers: about 45 us per call on this
project's 2-core CPU, against 5 us for the kernel of a small EDAB map, and a 360x480 frame makes about 190 such
calls. The operators here are defined on the dispatcher directly (a schema, a CPU kernel and a fake kernel for
``torch.compile``), which costs about 10 us per call. They have no autograd kernel: the model calls them only with
gradients off (training uses the PyTorch layers and the kernels that have a backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NAMESPACE = "ecmnet"

# One fragment of the namespace for every operator defined here (the objects must stay alive).
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
# operator -> its CPU kernel, for graphs that call the kernel without the dispatcher (see direct_kernel)
_KERNELS: dict[torch._ops.OpOverload, Callable] = {}


def cpu_inference_op(name: str, schema: str, fake: Callable) -> Callable[[Callable], torch._ops.OpOverload]:
    """Decorator: define ``torch.ops.ecmnet.<name>`` with ``schema`` (the part after the name, e.g.
    ``"(Tensor x, Tensor params) -> Tensor"``), the decorated function as its CPU kernel and ``fake`` (same
    arguments, returns empty tensors of the output shapes) for tracing without data; returns the operator."""

    def register(kernel: Callable) -> torch._ops.OpOverload:
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, kernel, "CPU")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
        op.__doc__ = kernel.__doc__
        _KERNELS[op] = _profiled(op, kernel)
        return op

    return register


def direct_kernel(op: object) -> Callable | None:
    """The CPU kernel behind ``op`` when it is one of the operators defined here, else None. A captured CPU graph
    calls it directly: the same function and checks, without the ~9 us the dispatcher's trip back into Python
    costs per call (~190 calls a frame). While the PyTorch profiler runs, the call goes through the operator, so
    that profiles still name it (``bench profile``)."""
    return _KERNELS.get(op)  # type: ignore[call-overload]


def _profiled(op: torch._ops.OpOverload, kernel: Callable) -> Callable:
    profiling = torch._C._autograd._profiler_enabled

    def call(*args):
        return op(*args) if profiling() else kernel(*args)

    call.__name__ = call.__qualname__ = f"{NAMESPACE}_{kernel.__name__}"
    call.__doc__ = kernel.__doc__
    return call


def nhwc_memory(t: Tensor) -> Tensor:
    """``t`` itself when its memory is already (B, H, W, C) (channels_last, or single-channel), else a channels-last
    copy. The kernels read raw pointers: keep a reference to the result while they run."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def empty_nhwc(b: int, c: int, h: int, w: int, like: Tensor) -> Tensor:
    """An empty channels-last (B, C, H, W) tensor with ``like``'s dtype and device (also what fake kernels return)."""
    return torch.empty((b, c, h, w), dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


__all__ = ["NAMESPACE", "cpu_inference_op", "direct_kernel", "empty_nhwc", "nhwc_memory"]
