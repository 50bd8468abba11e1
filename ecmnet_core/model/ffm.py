"""FFM: feature fusion module at the bottleneck (concat -> VSS block with SS2D -> FFN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.model.layers import ConvBNPReLU, adaptive_avg_pool
from ecmnet_core.model.ss2d import SS2D


class VSSBlock(nn.Module):
    """x + SS2D(LN(x)), channels-last (B, H, W, C)."""

    def __init__(self, dim: int, d_state: int = 16, expand: float = 2.0, scan_backend: str | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, d_state=d_state, expand=expand, scan_backend=scan_backend)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ss2d(self.norm(x))


class FFN(nn.Module):
    """x + Linear(GELU(Linear(LN(x)))), channels-last (B, H, W, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class FFM(nn.Module):
    """Fuse multi-level features at the reference (1/16) size: inputs are pooled to ``features[-1]``'s size,
    concatenated, 1x1-fused to ``width``, passed through VSS + FFN, and projected to ``c_out``.

    (B, sum(c_in), h, w) -> (B, c_out, h, w).
    """

    def __init__(self, c_in: int, width: int, c_out: int, ffn_ratio: float = 2.5, d_state: int = 16,
                 expand: float = 2.0, scan_backend: str | None = None) -> None:
        super().__init__()
        self.fuse = ConvBNPReLU(c_in, width, 1)
        self.vss = VSSBlock(width, d_state=d_state, expand=expand, scan_backend=scan_backend)
        self.ffn = FFN(width, int(width * ffn_ratio))
        self.proj = ConvBNPReLU(width, c_out, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[-1].shape[-2:]
        pooled = [f if f.shape[-2:] == size else adaptive_avg_pool(f, size) for f in features]
        x = self.fuse(torch.cat(pooled, dim=1)).permute(0, 2, 3, 1)
        x = self.ffn(self.vss(x))
        return self.proj(x.permute(0, 3, 1, 2).contiguous())
