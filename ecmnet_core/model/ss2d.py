"""SS2D: VMamba's 2-D selective scan over four directions (v0 formulation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.ops.selective_scan import resolve_backend, selective_scan_fn


class SelectiveScan(nn.Module):
    """Module wrapper around :func:`selective_scan_fn` so the backend is reported and cost hooks can see it.

    ``backend`` None means automatic (argument > ``ECMNET_SCAN_BACKEND`` > auto). Runs in fp32 under autocast.
    """

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.last_backend: str | None = None

    def resolved_backend(self, device: torch.device | str) -> str:
        return resolve_backend(self.backend, device)

    def forward(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                delta_bias: Tensor) -> Tensor:
        if not torch.jit.is_tracing():
            self.last_backend = self.resolved_backend(u.device)
        with torch.autocast(device_type=u.device.type, enabled=False):
            return selective_scan_fn(u.float(), delta.float(), A, B.float(), C.float(), D, None,
                                     delta_bias, True, backend=self.backend)

    @staticmethod
    def flops(u_shape: torch.Size, n_state: int) -> int:
        """Analytic cost of one scan, VMamba's formula: 9*B*L*D*N + B*D*L (D = K * d_inner)."""
        b, d, length = u_shape
        return 9 * b * length * d * n_state + b * d * length


class SS2D(nn.Module):
    """Four-direction selective scan. Input and output channels-last: (B, H, W, C) -> (B, H, W, C).

    Directions: row-major, column-major and both reversed; outputs merged back to row-major and summed.
    """

    directions = 4

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 dt_rank: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, scan_backend: str | None = None) -> None:
        super().__init__()
        k = self.directions
        d_inner = int(expand * d_model)
        self.d_inner, self.d_state = d_inner, d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        bound = d_inner ** -0.5
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        dt_bound = self.dt_rank ** -0.5 * dt_scale
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank).uniform_(-dt_bound, dt_bound))
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))  # S4D-real
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]
        self.scan = SelectiveScan(scan_backend)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    @staticmethod
    def cross_scan(x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 4, C, L): row-major, column-major, and both reversed."""
        b, c, h, w = x.shape
        rows = x.reshape(b, c, h * w)
        cols = x.transpose(2, 3).reshape(b, c, h * w)
        fwd = torch.stack([rows, cols], dim=1)
        return torch.cat([fwd, fwd.flip(-1)], dim=1)

    @staticmethod
    def cross_merge(ys: Tensor, h: int, w: int) -> Tensor:
        """(B, 4, C, L) -> (B, C, L) in row-major order: the inverse mappings of :meth:`cross_scan`, summed."""
        b, _, c, length = ys.shape
        # unbind, not ys[:, k]: each indexing's backward zero-fills a gradient the size of all of ys (4 x 22 MB a
        # training step at 360x480, batch 8); unbind's stacks the four. Same values.
        y0, y1, y2, y3 = ys.unbind(1)
        rows = y0 + y2.flip(-1)
        cols = (y1 + y3.flip(-1)).view(b, c, w, h).transpose(2, 3).reshape(b, c, length)
        return rows + cols

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        k, d, n, r = self.directions, self.d_inner, self.d_state, self.dt_rank
        xz = self.in_proj(x)
        xs, z = xz.chunk(2, dim=-1)
        xs = F.silu(self.conv2d(xs.permute(0, 3, 1, 2).contiguous()))
        length = h * w
        seqs = self.cross_scan(xs)  # (B, K, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", seqs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = self.scan(
            seqs.reshape(b, k * d, length), dts.reshape(b, k * d, length), -torch.exp(self.A_logs.float()),
            bs.contiguous(), cs.contiguous(), self.Ds.float(), self.dt_projs_bias.float().reshape(-1),
        ).view(b, k, d, length)
        y = self.cross_merge(ys, h, w).transpose(1, 2).reshape(b, h, w, d)
        y = self.out_norm(y.to(x.dtype)) * F.silu(z)
        return self.out_proj(y)
