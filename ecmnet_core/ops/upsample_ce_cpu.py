"""Bilinear upsampling of class logits fused with the weighted cross-entropy, for CPU training (compiled kernel with
its backward).

With ``classify_before_upsample`` the classifier runs at 1/2 resolution; upsampling its logits to the label size and
taking PyTorch's cross-entropy then creates and walks several full-resolution (B, K, H, W) tensors forward and
backward, about a tenth of a training step at 360x480. The kernel (``csrc/upsample_ce_cpu.cpp``) interpolates each
label pixel's logits in registers and, in the backward, scatters its gradient straight back to the low-resolution
logits. Built on first use and cached (:mod:`ecmnet_core.ops.cbuild`, cache ``upsample_ce_cpu``).

:func:`upsample_cross_entropy` is exactly ``F.cross_entropy(F.interpolate(logits, size=target.shape[-2:],
mode="bilinear", align_corners=False), target, weight, ignore_index=ignore_index)`` (mean over the weights of the
counted pixels). :func:`fits` says when it applies: fp32 CPU channels-last logits, int64 targets, nothing being
traced or exported, no autocast.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ecmnet_core.ops import cbuild

ABI_VERSION = 1
K_MAX = 256

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int

#: OpenMP build: the kernel runs on PyTorch's intra-op threads.
KERNEL = cbuild.Kernel("upsample_ce_cpu", "ecmnet_uce_abi_version", ABI_VERSION, {
    "ecmnet_upsample_ce_forward": ([_P] * 4 + [_I64] * 7 + [_INT], _INT),
    "ecmnet_upsample_ce_backward": ([_P] * 4 + [ctypes.c_float] + [_I64] * 7 + [_INT], _INT)},
    what="compiled CPU upsampling cross-entropy", extra_flags=("-fopenmp",))


load_library = KERNEL.load


def is_available() -> bool:
    return load_library() is not None


def _check(code: int, what: str) -> None:
    cbuild.check_status(code, f"upsampling cross-entropy kernel {what}")


class _UpsampleCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int):  # type: ignore[override]
        b, k, h, w = logits.shape
        oh, ow = target.shape[-2:]
        rows = logits.permute(0, 2, 3, 1)  # (B, h, w, K) view of the channels-last logits
        tgt = target.contiguous()
        wt = weight.detach().float().contiguous() if weight is not None else None
        sums = torch.zeros(2, dtype=torch.float64)
        _check(load_library().ecmnet_upsample_ce_forward(
            rows.data_ptr(), tgt.data_ptr(), wt.data_ptr() if wt is not None else None, sums.data_ptr(),
            b, k, h, w, oh, ow, int(ignore_index), torch.get_num_threads()), "forward")
        loss_sum, weight_sum = float(sums[0]), float(sums[1])
        ctx.save_for_backward(rows, tgt, wt)
        ctx.meta = (b, k, h, w, oh, ow, int(ignore_index), weight_sum)
        # PyTorch's mean: 0 / 0 = nan when every pixel is ignored
        return logits.new_tensor(loss_sum / weight_sum if weight_sum > 0 else float("nan"))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rows, tgt, wt = ctx.saved_tensors
        b, k, h, w, oh, ow, ignore, weight_sum = ctx.meta
        dlogits = torch.empty((b, k, h, w), dtype=rows.dtype, memory_format=torch.channels_last)
        g = float(grad) / weight_sum if weight_sum > 0 else float("nan")
        _check(load_library().ecmnet_upsample_ce_backward(
            rows.data_ptr(), tgt.data_ptr(), wt.data_ptr() if wt is not None else None, dlogits.data_ptr(), g,
            b, k, h, w, oh, ow, ignore, torch.get_num_threads()), "backward")
        return dlogits, None, None, None


def fits(logits: Tensor, target: Tensor) -> bool:
    """True when :func:`upsample_cross_entropy` can stand in for interpolate + cross-entropy."""
    return (logits.dim() == 4 and target.dim() == 3 and logits.device.type == "cpu" == target.device.type
            and logits.dtype == torch.float32 and target.dtype == torch.int64 and target.shape[0] == logits.shape[0]
            and 0 < logits.shape[1] <= K_MAX and logits.numel() > 0 and target.numel() > 0
            and logits.permute(0, 2, 3, 1).is_contiguous()
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export() and is_available())


def upsample_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None,
                           ignore_index: int = 255) -> Tensor:
    """Weighted cross-entropy of ``logits`` bilinearly upsampled (align_corners=False) to ``target``'s size.

    logits: (B, K, h, w) fp32 channels-last CPU; target: (B, H, W) int64 -> scalar (mean over the counted pixels'
    weights, as ``F.cross_entropy``). Labels must already be checked (other than ``ignore_index``, in [0, K)).
    """
    return _UpsampleCrossEntropy.apply(logits, target, weight, ignore_index)


__all__ = ["ABI_VERSION", "KERNEL", "fits", "is_available", "load_library",
           "upsample_cross_entropy"]
