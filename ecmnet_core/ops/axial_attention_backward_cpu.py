"""DDA's axial attention for CPU training: the compiled forward with a compiled backward.

PyTorch's batched-matmul attention keeps the (sequences, S, S) scores and probabilities of both passes for its
backward and walks them several times (scores, softmax, two matmuls forward; four matmuls and the softmax backward),
about a fifth of a training step at 360x480. Here the forward is the inference kernel
(``csrc/axial_attention_cpu.cpp``), which also writes each query's log-sum-exp, and the backward
(``csrc/axial_attention_backward_cpu.cpp``) rebuilds the softmax from it, flash-attention style: nothing of size
S x S is stored. Both built on first use and cached (:mod:`ecmnet_core.ops.cbuild`).

:func:`axial_attention_train` is ``axial_attention_torch(q, k, v, scale)`` with gradients for q, k and v.
:func:`fits` says when it applies: fp32 CPU tensors, nothing being traced or exported, no autocast.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ecmnet_core.ops import axial_attention_cpu, cbuild
from ecmnet_core.ops.op_registry import empty_nhwc, nhwc_memory

ABI_VERSION = 1

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int

#: OpenMP build: the kernel runs on PyTorch's intra-op threads.
KERNEL = cbuild.Kernel("axial_attention_backward_cpu", "ecmnet_attn_bwd_abi_version", ABI_VERSION, {
    "ecmnet_axial_attention_backward": ([_P] * 8 + [_I64] * 5 + [ctypes.c_float, _INT], _INT)},
    what="compiled CPU axial-attention backward", extra_flags=("-fopenmp",))


load_library = KERNEL.load


def is_available() -> bool:
    return load_library() is not None and axial_attention_cpu.is_available()


class _AxialAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float):  # type: ignore[override]
        b, _, h, w = q.shape
        qc, kc, vc = nhwc_memory(q), nhwc_memory(k), nhwc_memory(v)  # views for channels-last input
        lse = torch.empty(2, b, h, w, dtype=torch.float32)
        out = axial_attention_cpu.launch(qc, kc, vc, scale, lse)  # fits() checked the inputs
        ctx.save_for_backward(qc, kc, vc, lse)
        ctx.scale = float(scale)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        qc, kc, vc, lse = ctx.saved_tensors
        b, d, h, w = qc.shape
        c = vc.shape[1]
        g = nhwc_memory(dout)
        dq, dk, dv = empty_nhwc(b, d, h, w, like=vc), empty_nhwc(b, d, h, w, like=vc), empty_nhwc(b, c, h, w, like=vc)
        cbuild.check_status(load_library().ecmnet_axial_attention_backward(
            qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), g.data_ptr(), lse.data_ptr(), dq.data_ptr(), dk.data_ptr(),
            dv.data_ptr(), b, d, c, h, w, ctx.scale, torch.get_num_threads()), "axial attention backward kernel")
        return dq, dk, dv, None


def fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when :func:`axial_attention_train` can stand in for the PyTorch attention (see the module docstring)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in (q, k, v))
            and q.shape == k.shape and v.shape[0] == q.shape[0] and v.shape[2:] == q.shape[2:] and q.numel() > 0
            and v.numel() > 0 and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export() and is_available())


def axial_attention_train(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """O_h + O_w with gradients: q, k (B, dk, H, W), v (B, C, H, W) fp32 CPU -> (B, C, H, W) channels-last."""
    return _AxialAttentionFunction.apply(q, k, v, scale)


__all__ = ["ABI_VERSION", "KERNEL", "axial_attention_train", "fits", "is_available",
           "load_library"]
