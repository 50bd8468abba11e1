"""Convolutional building blocks shared by ECMNet's encoder and decoder (LETNet conventions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.ops import bn_prelu_cpu, depthwise_cpu, edab_cpu

BN_EPS = 1e-3


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameters and state-dict keys) that exports to ONNX as relu(x) - a * relu(-x).

    The identity is exact in floating point, and ONNX Runtime's broadcasting ``PRelu`` kernel is several times
    slower than two Relus, a Mul and a Sub on NCHW tensors (8.3 vs 3.2 ms for a 1x1 conv + PReLU at 32x180x240).
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            a = self.weight.reshape(1, -1, *([1] * (x.dim() - 2))) if self.weight.numel() > 1 else self.weight
            return F.relu(x) - a * F.relu(-x)
        return F.prelu(x, self.weight)


class BNPReLU(nn.Sequential):
    """BatchNorm2d(eps=1e-3) followed by a per-channel PReLU. (B, C, H, W) -> same.

    ``fused``: in training, on fp32 channels-last CPU tensors, run both as one compiled kernel with its backward
    (:mod:`ecmnet_core.ops.bn_prelu_cpu`; same function, same running-statistics update). A plain attribute, not
    saved in checkpoints; the fast training path turns it on.

    ``affine``: after :func:`ecmnet_core.model.fuse.optimize_for_inference`, the eval-mode BatchNorm and PReLU as
    one (3, C) block; CPU fp32 channels-last inference then runs them as one compiled kernel
    (:func:`ecmnet_core.ops.edab_cpu.affine_prelu_cpu`). A non-persistent buffer.
    """

    fused: bool = False
    affine: Tensor | None

    def __init__(self, channels: int) -> None:
        super().__init__(nn.BatchNorm2d(channels, eps=BN_EPS), PReLU(channels))
        self.register_buffer("affine", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.affine is not None and not torch.is_grad_enabled() and edab_cpu.usable(x):
            return edab_cpu.affine_prelu_op(x, self.affine)
        bn, prelu = self[0], self[1]
        if self.fused and self.training and isinstance(bn, nn.BatchNorm2d) and bn_prelu_cpu.fits(x, bn):
            return bn_prelu_cpu.bn_prelu_train(x, bn, prelu.weight)
        return prelu(bn(x))


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with groups == channels (same parameters and state-dict keys).

    ``fast``: with gradients on fp32 channels-last CPU tensors, a dilated or larger-than-3x3 kernel runs its backward
    as a compiled kernel (:mod:`ecmnet_core.ops.depthwise_cpu`; oneDNN's is 10-30x slower there). Same function. A
    plain attribute, not saved in checkpoints; the fast training path turns it on.
    """

    fast: bool = False

    def __init__(self, channels: int, kernel: int | tuple[int, int], padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True) -> None:
        super().__init__(channels, channels, kernel, 1, padding, dilation, channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and torch.is_grad_enabled() and depthwise_cpu.fits(x, self):
            return depthwise_cpu.depthwise_conv(x, self)
        return super().forward(x)


class ConvBNPReLU(nn.Sequential):
    """Bias-free conv, optionally followed by BNPReLU (LETNet's ``Conv`` with ``bn_acti``). A depthwise conv
    (groups == c_in == c_out, stride 1) is a :class:`DepthwiseConv2d`."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1,
                 bn_acti: bool = True, bias: bool = False) -> None:
        conv = (DepthwiseConv2d(c_in, kernel, padding, dilation, bias=bias) if groups == c_in == c_out and stride == 1
                else nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=bias))
        layers: list[nn.Module] = [conv]
        if bn_acti:
            layers.append(BNPReLU(c_out))
        super().__init__(*layers)


class DownSamplingBlock(nn.Module):
    """Stride-2 reduction. Widening (c_in < c_out): conv to c_out-c_in concatenated with a max-pool of the input.

    (B, c_in, H, W) -> (B, c_out, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.widen = c_in < c_out
        self.conv = nn.Conv2d(c_in, c_out - c_in if self.widen else c_out, 3, 2, 1, bias=False)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True) if self.widen else None
        self.bn_prelu = BNPReLU(c_out)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.pool is not None:
            out = torch.cat([out, self.pool(x)], dim=1)
        return self.bn_prelu(out)


class UpsamplingBlock(nn.Sequential):
    """ConvTranspose2d(k3, s2) + BN + ReLU6: (B, c_in, H, W) -> (B, c_out, 2H, 2W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=True),
            nn.BatchNorm2d(c_out, eps=BN_EPS),
            nn.ReLU6(inplace=True),
        )


class LongConnection(nn.Sequential):
    """LETNet's skip projection: 3x1 conv c_in -> c_in/2, then 1x3 conv -> c_out, both with bias."""

    def __init__(self, c_in: int, c_out: int) -> None:
        mid = c_in // 2
        super().__init__(nn.Conv2d(c_in, mid, (3, 1), padding=(1, 0)), nn.Conv2d(mid, c_out, (1, 3), padding=(0, 1)))


class PA(nn.Module):
    """Pixel attention: x * sigmoid(conv1x1(x))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.conv(x))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: (B, g*k, H, W) -> interleave the g groups. Keeps a channels-last input
    channels-last (otherwise every EDAB would hand NCHW to the next block and force layout conversions)."""
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1).reshape(b, h, w, groups, c // groups).transpose(3, 4).reshape(b, h, w, c)
        return nhwc.permute(0, 3, 1, 2)
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def resize_to(x: Tensor, ref: Tensor) -> Tensor:
    """Bilinearly resize x to ref's spatial size when they differ (odd input sizes such as 360x480)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def _pool_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in) averaging weights with adaptive pooling's bins [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    m = torch.zeros(n_out, n_in, dtype=like.dtype, device=like.device)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """``F.adaptive_avg_pool2d``; while exporting to ONNX written as two matrix products, because the exporter only
    handles output sizes that divide the input size (a 360x480 input pools 45x60 to 23x30).

    (B, C, H, W) -> (B, C, h, w).
    """
    if not torch.onnx.is_in_onnx_export():
        return F.adaptive_avg_pool2d(x, size)
    h_in, w_in = int(x.shape[-2]), int(x.shape[-1])
    rows, cols = _pool_matrix(h_in, int(size[0]), x), _pool_matrix(w_in, int(size[1]), x)
    return torch.matmul(torch.matmul(rows, x), cols.t())
