"""Depthwise convolution for CPU training: oneDNN's forward with a compiled backward.

ECMNet's EDABs and MSAUs run about thirty depthwise convolutions per training step that are dilated ((3, 1) and
(1, 3) at dilations 2 to 16) or large (5x5, 7x7). For those, oneDNN's channels-last fp32 *backward* leaves its fast
path: 12-33 ms a call against 1-3 ms for the same shapes undilated, about half of all convolution-backward time of
a step at 360x480 (``ecmnet-core bench train``). The kernel (``csrc/depthwise_cpu.cpp``) is written for memory
traffic: one pass for the input gradient, one for the weight and bias gradients. Built on first use and cached like
the other kernels (:mod:`ecmnet_core.ops.cbuild`, cache ``depthwise_cpu``).

:func:`depthwise_conv` is exactly ``F.conv2d(x, weight, bias, 1, padding, dilation, groups=C)`` for a padding that
keeps the size. :func:`fits` says when it applies: fp32 CPU channels-last input, a (C, 1, kh, kw) weight, stride 1,
zero "same" padding, dilated or larger than 3x3 (elsewhere oneDNN's backward is as fast), nothing being traced or
exported, no autocast; callers use PyTorch otherwise.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.ops import cbuild

ABI_VERSION = 1
TAPS_MAX = 121

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int

#: OpenMP build: the kernel runs on PyTorch's intra-op threads.
KERNEL = cbuild.Kernel("depthwise_cpu", "ecmnet_dw_abi_version", ABI_VERSION, {
    "ecmnet_dw_backward": ([_P] * 6 + [_I64] * 10 + [_INT], _INT)},
    what="compiled CPU depthwise convolution", extra_flags=("-fopenmp",))


load_library = KERNEL.load


def is_available() -> bool:
    return load_library() is not None


def _check(code: int, what: str) -> None:
    cbuild.check_status(code, f"depthwise convolution kernel {what}")


def _taps(weight: Tensor) -> Tensor:
    """(C, 1, kh, kw) -> the (kh * kw, C) rows the kernel reads."""
    return weight.detach().reshape(weight.shape[0], -1).t().contiguous()


class _DepthwiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: tuple[int, int],  # type: ignore[override]
                padding: tuple[int, int]):
        kh, kw = weight.shape[-2:]
        ctx.save_for_backward(x.permute(0, 2, 3, 1), _taps(weight))  # (B, H, W, C) view of the channels-last input
        ctx.geometry = (kh, kw, *dilation, *padding)
        ctx.weight_shape = weight.shape
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        xr, wt = ctx.saved_tensors
        b, h, w, c = xr.shape
        dy = dout.permute(0, 2, 3, 1).contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.empty(b, h, w, c, dtype=xr.dtype) if need_x else None
        dwt = torch.empty_like(wt) if need_w else None
        db = torch.empty(c, dtype=xr.dtype) if need_b and ctx.has_bias else None
        _check(load_library().ecmnet_dw_backward(
            dy.data_ptr(), xr.data_ptr(), wt.data_ptr(), dx.data_ptr() if dx is not None else None,
            dwt.data_ptr() if dwt is not None else None, db.data_ptr() if db is not None else None,
            b, h, w, c, *ctx.geometry, torch.get_num_threads()), "backward")
        dweight = dwt.t().reshape(ctx.weight_shape) if dwt is not None else None
        return (dx.permute(0, 3, 1, 2) if dx is not None else None), dweight, db, None, None


def fits(x: Tensor, conv: nn.Conv2d) -> bool:
    """True when :func:`depthwise_conv` can stand in for ``conv(x)`` (see the module docstring)."""
    c = x.shape[1] if x.dim() == 4 else -1
    kh, kw = conv.kernel_size
    (dh, dw), (ph, pw) = conv.dilation, conv.padding if isinstance(conv.padding, tuple) else (-1, -1)
    return (x.dim() == 4 and conv.groups == c == conv.in_channels == conv.out_channels and c > 0
            and (dh > 1 or dw > 1 or max(kh, kw) > 3)
            and conv.stride == (1, 1) and conv.padding_mode == "zeros" and 2 * ph == dh * (kh - 1)
            and 2 * pw == dw * (kw - 1) and kh * kw <= TAPS_MAX and x.device.type == "cpu"
            and x.dtype == conv.weight.dtype == torch.float32 and x.numel() > 0
            and x.permute(0, 2, 3, 1).is_contiguous()
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export() and is_available())


def depthwise_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a depthwise ``conv`` that :func:`fits`. (B, C, H, W) channels-last -> same, channels-last."""
    return _DepthwiseFunction.apply(x, conv.weight, conv.bias, tuple(conv.dilation), tuple(conv.padding))


__all__ = ["ABI_VERSION", "KERNEL", "depthwise_conv", "fits", "is_available", "load_library"]
