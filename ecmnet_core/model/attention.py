"""Attention modules of EDAB: channel attention (ECA) and dual-direction attention (DDA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.ops import axial_attention_cpu
from ecmnet_core.ops.axial_attention import BACKENDS, axial_attention, resolve_backend


class ECA(nn.Module):
    """Efficient channel attention: x * sigmoid(Conv1d_k(avgpool(x))) across channels. (B, C, H, W) -> same."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x.mean(dim=(2, 3)))[:, :, None, None]

    def weights(self, mean: Tensor) -> Tensor:
        """(B, C) channel means -> (B, C) channel weights sigmoid(Conv1d_k(mean))."""
        return torch.sigmoid(self.conv(mean.unsqueeze(1))).squeeze(1)


class DDA(nn.Module):
    """Dual-direction attention: axial self-attention along height and along width, summed.

    q, k: 1x1 conv c -> max(c // 8, 1); v: 1x1 conv c -> c; shared by both passes.
    Output = x + gamma * (O_h + O_w), gamma initialised to 0. (B, c, H, W) -> same.
    ``backend``: attention backend of :func:`ecmnet_core.ops.axial_attention.axial_attention` (None: automatic,
    i.e. the compiled kernel for CPU fp32 inference); a plain attribute, not saved in checkpoints.
    ``qkv_weight``/``qkv_bias``: after :func:`ecmnet_core.model.fuse.optimize_for_inference`, the three 1x1
    convolutions stacked into one (non-persistent buffers); inference then runs one convolution and the kernel reads
    q, k and v from its output in place.
    """

    backend: str | None = None
    qkv_weight: Tensor | None
    qkv_bias: Tensor | None

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.key_dim = max(channels // reduction, 1)
        self.query = nn.Conv2d(channels, self.key_dim, 1)
        self.key = nn.Conv2d(channels, self.key_dim, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.attention(x)

    def attention(self, x: Tensor) -> Tensor:
        """O_h + O_w before the residual (EDAB's compiled merge adds x + gamma * this itself)."""
        scale = 1.0 / math.sqrt(self.key_dim)
        if self.qkv_weight is not None and self.qkv_bias is not None and not torch.is_grad_enabled():
            qkv = F.conv2d(x, self.qkv_weight, self.qkv_bias)
            q, k, v = qkv.split([self.key_dim, self.key_dim, qkv.shape[1] - 2 * self.key_dim], dim=1)
            if qkv.is_contiguous(memory_format=torch.channels_last) and resolve_backend(q, k, v, self.backend) == "cpp":
                return axial_attention_cpu.axial_attention_qkv_op(qkv, self.key_dim, scale)
            return axial_attention(q, k, v, scale, backend=self.backend)
        q, k, v = self.query(x), self.key(x), self.value(x)
        # compiled kernel for CPU fp32 inference, PyTorch otherwise (see ecmnet_core.ops.axial_attention)
        return axial_attention(q, k, v, scale, backend=self.backend)

    def attention_macs(self, x_shape: torch.Size) -> int:
        """Multiply-accumulates of the two attention products for an input of ``x_shape`` (not seen by hooks)."""
        b, c, h, w = x_shape
        return b * w * h * h * (self.key_dim + c) + b * h * w * w * (self.key_dim + c)


def set_attention_backend(model: nn.Module, backend: str | None) -> int:
    """Set ``backend`` (``torch``, ``cpp``, ``auto`` or None = automatic) on every DDA of ``model``; returns the count.

    For benchmarks and tests; the setting is not saved in checkpoints (it is a plain attribute, not a buffer).
    """
    if backend is not None and backend.strip().lower() not in ("auto", *BACKENDS):
        raise ValueError(f"unknown axial-attention backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    count = 0
    for module in model.modules():
        if isinstance(module, DDA):
            module.backend = backend
            count += 1
    return count


__all__ = ["ECA", "DDA", "set_attention_backend"]
