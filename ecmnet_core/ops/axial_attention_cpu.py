"""Compiled CPU axial attention: the ``cpp`` backend of :func:`ecmnet_core.ops.axial_attention.axial_attention`.

The kernel (``csrc/axial_attention_cpu.cpp``, plain C ABI, fp32) computes DDA's two axial softmax-attention passes,
out = O_h + O_w, in one call: one task per row, then, after a barrier, one per column adding to the rows' output,
on a per-call team of ``torch.get_num_threads()`` threads. It reads and writes channels-last memory, (B, H, W, C),
which is what a channels_last (B, C, H, W) tensor already holds. It is built on first use with the system compiler
and cached like the selective scan (:mod:`ecmnet_core.ops.cbuild`, cache directory ``axial_attention_cpu``). Without a
working compiler :func:`load_library` returns None after one warning and the dispatcher uses the ``torch`` backend.

There is no backward: the dispatcher uses this kernel only when no autograd graph is needed.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ecmnet_core.ops import cbuild
from ecmnet_core.ops.op_registry import cpu_inference_op, empty_nhwc, nhwc_memory

ABI_VERSION = 3

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_ARGTYPES = [_P] * 4 + [_I64] * 5 + [ctypes.c_float, _INT]
_STRIDED_ARGTYPES = [_P] * 4 + [_I64] * 7 + [ctypes.c_float, _INT]


#: OpenMP: the kernel then runs on PyTorch's intra-op threads (same libgomp.so.1 soname) instead of a team of its
#: own, which after a PyTorch op would compete with PyTorch's still-spinning workers for the cores.
KERNEL = cbuild.Kernel("axial_attention_cpu", "ecmnet_attn_abi_version", ABI_VERSION, {
    "ecmnet_axial_attention": (_ARGTYPES, _INT), "ecmnet_attn_lanes": (None, _INT),
    "ecmnet_axial_attention_strided": (_STRIDED_ARGTYPES, _INT),
    "ecmnet_axial_attention_lse": ([_P] * 5 + [_I64] * 5 + [ctypes.c_float, _INT], _INT)},
    what="compiled CPU axial attention", extra_flags=("-fopenmp",))


load_library = KERNEL.load


@torch.compiler.assume_constant_result  # torch.compile: decide once at trace time, no graph break
def is_available() -> bool:
    """True when the compiled kernel can be used (builds it on first call)."""
    return load_library() is not None


def _threads() -> int:
    """Threads for one kernel call: torch's intra-op setting."""
    return torch.get_num_threads()


def axial_attention_cpu(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """DDA's attention, O_h + O_w, with the compiled kernel; no autograd (the result has no gradient).

    Args:
        q, k: (B, dk, H, W) fp32 CPU.  v: (B, C, H, W) fp32 CPU.  Any memory format; channels_last avoids copies.
        scale: multiplies q . k before the softmax (DDA: 1 / sqrt(dk)).
    Returns:
        (B, C, H, W) fp32 in channels_last memory format: for every column the softmax attention over its H
        positions plus, for every row, that over its W positions.
    Raises:
        ValueError for wrong shapes, dtypes or devices; RuntimeError if the library cannot be built.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu":
            raise ValueError(f"axial attention backend 'cpp' needs CPU tensors; {name} is on {t.device}")
        if t.dtype != torch.float32:
            raise ValueError(f"axial attention backend 'cpp' needs float32 tensors; {name} is {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"axial attention: {name} must be (B, channels, H, W), got {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"axial attention: q and k must have the same shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    b, dk, h, w = q.shape
    if v.shape[0] != b or v.shape[2:] != q.shape[2:]:
        raise ValueError(f"axial attention: v must be ({b}, C, {h}, {w}), got {tuple(v.shape)}")
    c = v.shape[1]
    if dk < 1 or c < 1:
        raise ValueError(f"axial attention: q/k and v need at least one channel, got dk={dk}, C={c}")
    return launch(q, k, v, scale)


def launch(q: Tensor, k: Tensor, v: Tensor, scale: float, lse: Tensor | None = None) -> Tensor:
    """The kernel call behind :func:`axial_attention_cpu`, for inputs already checked. ``lse``: the training
    forward's (:mod:`ecmnet_core.ops.axial_attention_backward_cpu`) contiguous fp32 (2, B, H, W) output for each query's
    log2-sum-exp2 of its log2-unit scores, rows' pass first."""
    b, dk, h, w = q.shape
    c = v.shape[1]
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"compiled CPU axial attention unavailable: {KERNEL.error}")
    # Keep references to the contiguous copies: the kernel reads through raw pointers.
    qc, kc, vc = nhwc_memory(q), nhwc_memory(k), nhwc_memory(v)
    out = empty_nhwc(b, c, h, w, like=v)
    if lse is None:
        code = lib.ecmnet_axial_attention(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), b, dk, c, h, w,
                                          float(scale), _threads())
    else:
        code = lib.ecmnet_axial_attention_lse(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(),
                                              lse.data_ptr(), b, dk, c, h, w, float(scale), _threads())
    cbuild.check_status(code, "axial attention kernel")
    return out


def axial_attention_qkv_cpu(qkv: Tensor, dk: int, scale: float) -> Tensor:
    """:func:`axial_attention_cpu` on q, k, v stacked along the channels of one channels-last tensor (DDA's three
    1x1 convolutions as one): qkv (B, 2 dk + C, H, W), read in place -> (B, C, H, W) channels_last."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or qkv.dim() != 4:
        raise ValueError(f"axial attention: qkv must be a (B, 2 dk + C, H, W) float32 CPU tensor, got {qkv.dtype} "
                         f"{tuple(qkv.shape)} on {qkv.device}")
    b, total, h, w = qkv.shape
    c = total - 2 * dk
    if dk < 1 or c < 1:
        raise ValueError(f"axial attention: qkv has {total} channels, too few for dk={dk} and at least one value")
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"compiled CPU axial attention unavailable: {KERNEL.error}")
    base = nhwc_memory(qkv)  # a view for channels_last input
    ptr, f = base.data_ptr(), base.element_size()
    out = empty_nhwc(b, c, h, w, like=qkv)
    code = lib.ecmnet_axial_attention_strided(ptr, ptr + dk * f, ptr + 2 * dk * f, out.data_ptr(), b, dk, c, h, w,
                                              total, total, float(scale), _threads())
    cbuild.check_status(code, "axial attention kernel")
    return out


__all__ = ["ABI_VERSION", "KERNEL", "axial_attention_cpu", "axial_attention_qkv_cpu",
           "is_available", "load_library"]


# ---------------------------------------------------------------------------------------------------------------
# torch operators: traces and torch.compile keep the kernel as one opaque call (:mod:`ecmnet_core.ops.op_registry`)


@cpu_inference_op("axial_attention_cpu", "(Tensor q, Tensor k, Tensor v, float scale) -> Tensor",
                  lambda q, k, v, scale: empty_nhwc(*v.shape, like=v))
def axial_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """:func:`axial_attention_cpu` as ``torch.ops.ecmnet.axial_attention_cpu`` (no autograd)."""
    return axial_attention_cpu(q, k, v, scale)


@cpu_inference_op("axial_attention_qkv_cpu", "(Tensor qkv, int dk, float scale) -> Tensor",
                  lambda qkv, dk, scale: empty_nhwc(qkv.shape[0], qkv.shape[1] - 2 * dk, *qkv.shape[2:], like=qkv))
def axial_attention_qkv_op(qkv: Tensor, dk: int, scale: float) -> Tensor:
    """:func:`axial_attention_qkv_cpu` as ``torch.ops.ecmnet.axial_attention_qkv_cpu`` (no autograd)."""
    return axial_attention_qkv_cpu(qkv, dk, scale)
