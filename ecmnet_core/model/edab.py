"""EDAB: efficient dual-attention block (LETNet's DAB with DDA on the dilated branch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ecmnet_core.model.attention import DDA, ECA
from ecmnet_core.model.layers import BNPReLU, ConvBNPReLU, channel_shuffle
from ecmnet_core.ops import edab_cpu


class EDAB(nn.Module):
    """F_up = 1x3(3x1(1x1(x))); F_b1 = CA(DW1x3(DW3x1(F_up))); F_b2 = DDA(DWdil1x3(DWdil3x1(F_up)));
    Y = ChannelShuffle(1x1(F_up + F_b1 + F_b2) + x).

    The 1x1 conv halves the channels (h = C/2). (B, C, H, W) -> same.

    After :func:`ecmnet_core.model.fuse.optimize_for_inference` the buffers ``pair_b1``/``pair_b2`` hold the folded
    depthwise pairs of the two branches and ``merge`` the eval-mode ``bn_prelu_out``; CPU fp32 channels-last
    inference then runs compiled kernels (:mod:`ecmnet_core.ops.edab_cpu`): each depthwise pair in one pass
    (with ECA's channel means), the three-path sum with ECA's weights, DDA's residual and ``bn_prelu_out`` in one,
    the residual add with the channel shuffle in one. Same function.
    """

    pair_b1: Tensor | None
    pair_b2: Tensor | None
    merge: Tensor | None

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        h = channels // 2
        d = dilation
        self.bn_prelu_in = BNPReLU(channels)
        self.conv1x1_in = ConvBNPReLU(channels, h, 1, bn_acti=False)
        self.conv3x1 = ConvBNPReLU(h, h, (3, 1), padding=(1, 0))
        self.conv1x3 = ConvBNPReLU(h, h, (1, 3), padding=(0, 1))
        self.dconv3x1 = ConvBNPReLU(h, h, (3, 1), padding=(1, 0), groups=h)
        self.dconv1x3 = ConvBNPReLU(h, h, (1, 3), padding=(0, 1), groups=h)
        self.ca = ECA(3)
        self.ddconv3x1 = ConvBNPReLU(h, h, (3, 1), padding=(d, 0), dilation=(d, 1), groups=h)
        self.ddconv1x3 = ConvBNPReLU(h, h, (1, 3), padding=(0, d), dilation=(1, d), groups=h)
        self.dda = DDA(h)
        self.bn_prelu_out = BNPReLU(h)
        self.conv1x1_out = ConvBNPReLU(h, channels, 1, bn_acti=False)
        self.shuffle_groups = h
        self.dilation = d
        self.register_buffer("pair_b1", None, persistent=False)
        self.register_buffer("pair_b2", None, persistent=False)
        self.register_buffer("merge", None, persistent=False)

    def _use_kernel(self, f_up: Tensor) -> bool:
        return (self.pair_b1 is not None and self.pair_b2 is not None and self.merge is not None
                and not torch.is_grad_enabled() and edab_cpu.usable(f_up))

    def forward(self, x: Tensor) -> Tensor:
        f_up = self.conv1x3(self.conv3x1(self.conv1x1_in(self.bn_prelu_in(x))))
        if self._use_kernel(f_up):
            ops = edab_cpu
            t1, mean = ops.dw_pair_op(f_up, self.pair_b1, 1, 1, True)
            t2, _ = ops.dw_pair_op(f_up, self.pair_b2, self.dilation, self.dilation, False)
            y = ops.edab_merge_op(f_up, t1, self.ca.weights(mean), t2, self.dda.attention(t2), self.dda.gamma,
                                  self.merge)
            return ops.add_shuffle_op(self.conv1x1_out(y), x, self.shuffle_groups)
        b1 = self.ca(self.dconv1x3(self.dconv3x1(f_up)))
        b2 = self.dda(self.ddconv1x3(self.ddconv3x1(f_up)))
        out = self.conv1x1_out(self.bn_prelu_out(f_up + b1 + b2))
        return channel_shuffle(out + x, self.shuffle_groups)


class EDABStage(nn.Sequential):
    """A run of EDABs with the given dilations, closed by BNPReLU in the encoder (``closing_norm``)."""

    def __init__(self, channels: int, dilations: tuple[int, ...], closing_norm: bool = True) -> None:
        blocks: list[nn.Module] = [EDAB(channels, d) for d in dilations]
        if closing_norm:
            blocks.append(BNPReLU(channels))
        super().__init__(*blocks)
