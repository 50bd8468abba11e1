"""Fused training-mode BatchNorm2d + PReLU on the CPU (compiled kernel with its backward).

``BNPReLU`` (BN then per-channel PReLU) follows nearly every convolution of ECMNet. In training PyTorch runs it as
four kernels over the activation, and its PReLU backward is slow on channels-last tensors (a training step at
360x480 spent about a quarter of its time in the four). The kernel (``csrc/bn_prelu_cpu.cpp``) does each
direction in two passes over the (B*H*W, C) rows of a channels-last tensor; it is built on first use and cached
like the other kernels (:mod:`ecmnet_core.ops.cbuild`, cache ``bn_prelu_cpu``).

:func:`bn_prelu_train` is exactly ``prelu(batch_norm(x, training=True))`` including the running-statistics update
(momentum or cumulative average, unbiased variance), with gradients for x, the BN affine weights and the PReLU
weight. :func:`fits` says when it applies: fp32 CPU tensors in channels-last memory, BN in training mode with
running statistics, no autocast, nothing being traced or exported; callers use PyTorch otherwise.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from ecmnet_core.ops import cbuild

ABI_VERSION = 1

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int

#: OpenMP build: the kernel runs on PyTorch's intra-op threads.
KERNEL = cbuild.Kernel("bn_prelu_cpu", "ecmnet_bnp_abi_version", ABI_VERSION, {
    "ecmnet_bn_prelu_forward": ([_P] * 8 + [_I64, _I64, ctypes.c_float, _INT], _INT),
    "ecmnet_bn_prelu_backward": ([_P] * 11 + [_I64, _I64, _INT], _INT)},
    what="compiled CPU BatchNorm+PReLU", extra_flags=("-fopenmp",))


load_library = KERNEL.load


def is_available() -> bool:
    return load_library() is not None


def _rows(t: Tensor) -> Tensor:
    """(B, C, H, W) channels-last -> the (B*H*W, C) view the kernel reads (no copy)."""
    return t.permute(0, 2, 3, 1)


def _check(code: int, what: str) -> None:
    cbuild.check_status(code, f"BatchNorm+PReLU kernel {what}")


class _BNPReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, a: Tensor, eps: float):  # type: ignore[override]
        lib = load_library()
        b, c, h, w = x.shape
        xr = _rows(x).contiguous()  # a view for channels-last input
        out = torch.empty(b, h, w, c, dtype=x.dtype)
        mean, var, invstd = (torch.empty(c, dtype=torch.float32) for _ in range(3))
        gamma_c, beta_c, a_c = (t.detach().contiguous() for t in (gamma, beta, a.expand(c)))
        _check(lib.ecmnet_bn_prelu_forward(xr.data_ptr(), gamma_c.data_ptr(), beta_c.data_ptr(), a_c.data_ptr(),
                                           out.data_ptr(), mean.data_ptr(), var.data_ptr(), invstd.data_ptr(),
                                           b * h * w, c, float(eps), torch.get_num_threads()), "forward")
        ctx.save_for_backward(xr, mean, invstd, gamma_c, beta_c, a_c)
        ctx.a_shape = a.shape
        ctx.mark_non_differentiable(mean, var)
        return out.permute(0, 3, 1, 2), mean, var

    @staticmethod
    def backward(ctx, dout: Tensor, _dmean, _dvar):  # type: ignore[override]
        xr, mean, invstd, gamma, beta, a = ctx.saved_tensors
        b, h, w, c = xr.shape
        dy = _rows(dout).contiguous()
        need_x = ctx.needs_input_grad[0]
        dx = torch.empty(b, h, w, c, dtype=xr.dtype) if need_x else None
        dgamma, dbeta, da = (torch.empty(c, dtype=torch.float32) for _ in range(3))
        _check(load_library().ecmnet_bn_prelu_backward(
            dy.data_ptr(), xr.data_ptr(), mean.data_ptr(), invstd.data_ptr(), gamma.data_ptr(), beta.data_ptr(),
            a.data_ptr(), dx.data_ptr() if dx is not None else None, dgamma.data_ptr(), dbeta.data_ptr(),
            da.data_ptr(), b * h * w, c, torch.get_num_threads()), "backward")
        da = da.sum().reshape(ctx.a_shape) if ctx.a_shape.numel() == 1 else da.reshape(ctx.a_shape)
        return (dx.permute(0, 3, 1, 2) if dx is not None else None), dgamma, dbeta, da, None


def fits(x: Tensor, bn: nn.BatchNorm2d) -> bool:
    """True when :func:`bn_prelu_train` can stand in for ``prelu(bn(x))`` (see the module docstring)."""
    return (bn.training and bn.track_running_stats and bn.affine and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.shape[1] > 0 and x.numel() > x.shape[1]
            and x.permute(0, 2, 3, 1).is_contiguous()
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export() and is_available())


def bn_prelu_train(x: Tensor, bn: nn.BatchNorm2d, prelu_weight: Tensor) -> Tensor:
    """``prelu(bn(x), prelu_weight)`` for a BN in training mode, updating its running statistics like PyTorch.

    x: (B, C, H, W) fp32 channels-last CPU -> same shape, channels-last.
    """
    out, mean, var = _BNPReLUFunction.apply(x, bn.weight, bn.bias, prelu_weight, bn.eps)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        n = x.numel() // x.shape[1]
        bn.running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
        bn.running_var.mul_(1.0 - momentum).add_(var * (n / max(n - 1, 1)), alpha=momentum)
    return out


__all__ = ["ABI_VERSION", "KERNEL", "bn_prelu_train", "fits", "is_available", "load_library"]
