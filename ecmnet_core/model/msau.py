"""MSAU: multi-scale attention unit on the long skip connections."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ecmnet_core.model.layers import DepthwiseConv2d


class MSAU(nn.Module):
    """Spatial branch x channel branch, plus the input.

    Spatial: t = 1x1 C->h; m = DW3(t) + DW5(t) + DW7(t); p = mean_H(m) (B,h,1,W);
    s = sigmoid(PW(DW7(p))); sp = 1x1 h->C (m * s).
    Channel: ch = sigmoid(E(avgpool(x)) + E(maxpool(x))), E a shared Conv1d(1, 1, 3).
    Output = sp * ch + x. (B, C, H, W) -> same.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        h = channels // 2
        self.reduce = nn.Conv2d(channels, h, 1)
        self.dw3 = DepthwiseConv2d(h, 3, padding=1)
        self.dw5 = DepthwiseConv2d(h, 5, padding=2)
        self.dw7 = DepthwiseConv2d(h, 7, padding=3)
        self.spatial_dw = DepthwiseConv2d(h, 7, padding=3)
        self.spatial_pw = nn.Conv2d(h, h, 1)
        self.expand = nn.Conv2d(h, channels, 1)
        self.channel_conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        t = self.reduce(x)
        m = self.dw3(t) + self.dw5(t) + self.dw7(t)
        p = m.mean(dim=2, keepdim=True)
        s = torch.sigmoid(self.spatial_pw(self.spatial_dw(p)))
        sp = self.expand(m * s)
        avg = self.channel_conv(x.mean(dim=(2, 3)).unsqueeze(1))
        mx = self.channel_conv(x.amax(dim=(2, 3)).unsqueeze(1))
        ch = torch.sigmoid(avg + mx).transpose(1, 2).unsqueeze(-1)  # (B, C, 1, 1)
        return sp * ch + x
