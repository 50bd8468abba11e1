"""Triton selective scan: the ``triton`` backend for CUDA machines without mamba-ssm.

Same semantics as mamba-ssm's ``selective_scan_fn`` (see :mod:`ecmnet_core.ops.selective_scan`)::

    delta = softplus(delta + delta_bias)            # when delta_softplus
    h_t   = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B[t, n] * u_t
    y_t   = sum_n C[t, n] * h_t + D[d] * u_t
    out   = y * silu(z)                              # when z is given

Kernel design. One program per (batch, group, block of ``block_d`` channels of that group), so the program loads
its group's B and C rows once for all its channels. Time is processed in chunks of ``chunk`` steps: a chunk's
decays exp(delta*A) and drives delta*B*u form a (block_d, N, chunk) register tile that is scanned along time with
``tl.associative_scan`` (the linear-recurrence operator (a1, b1) . (a2, b2) = (a1*a2, a2*b1 + b2)); the state at
the chunk's end is carried to the next chunk in registers, so the loop over L stays inside the kernel.

The forward stores the state at the start of every chunk, (batch, L/chunk, dim, N) fp32, which is all the backward
needs: it walks the chunks in reverse, recomputes the chunk's states from the stored start with the same forward
scan, and runs the reverse-time recurrence grad_h_t = C_t*dy_t + exp(delta_{t+1}*A)*grad_h_{t+1} as a reverse
associative scan, carrying grad_h across chunk boundaries in registers. Activation memory is
O(batch*dim*N*L/chunk) on top of the inputs; no (batch, dim, L, N) tensor exists anywhere.

Gradients: du and ddelta are per channel (plain stores); dB and dC sum over the channels of a group, so when a group
spans several channel blocks they are accumulated with fp32 atomics (order-dependent in the last bits), otherwise
stored; dA is written as per-batch partial sums and reduced with ``sum(0)`` (deterministic). delta_bias, softplus,
D and the z gate are applied in PyTorch around the kernels, so autograd handles their gradients, as in the
``torch`` backend.

Without a GPU the kernels run in Triton's interpreter (numpy) on CPU tensors when ``TRITON_INTERPRET=1`` is set
before this module is imported (Triton decides at decoration time); that is how the tests check them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional dependency: only CUDA machines (or the interpreter) can use this backend
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["DEFAULT_CONFIG", "TritonScanConfig", "interpreting", "selective_scan_triton", "triton_available"]


@dataclass(frozen=True)
class TritonScanConfig:
    """Launch parameters of the scan kernels (all powers of two).

    ``chunk`` is also the granularity of the states stored for the backward, so forward and backward share it.
    A (block_d, next_pow2(N), chunk) fp32 tile per operand lives in registers. The defaults were chosen from
    ptxas resource usage for sm_90 at N = 16 (forward 110 registers, backward 117, no spills); larger tiles
    (block_d 4, chunk 64) spill in the backward. They are not tuned by timing yet: ``python -m
    ecmnet_core.bench.triton_check --sweep`` times alternatives on a GPU.
    """

    block_d: int = 4
    chunk: int = 32
    num_warps_fwd: int = 4
    num_warps_bwd: int = 8

    def __post_init__(self) -> None:
        for name in ("block_d", "chunk", "num_warps_fwd", "num_warps_bwd"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TritonScanConfig.{name} must be a power of two >= 1, got {value}")


DEFAULT_CONFIG = TritonScanConfig()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Triton is importable and can run the kernels: on CUDA, or anywhere in interpreter mode."""
    if triton is None:
        return False
    return interpreting() or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# kernels

if triton is not None:

    @triton.jit
    def _linear_combine(a_l, b_l, a_r, b_r):
        # h -> a_l*h + b_l, then h -> a_r*h + b_r (left is earlier in a forward scan, later in a reverse one)
        return a_l * a_r, b_l * a_r + b_r

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr,  # inputs, fp32 contiguous
        y_ptr, hs_ptr, last_ptr,  # outputs: y (b, dim, L), chunk starts (b, chunks, dim, N), last (b, dim, N)
        dim, dim_per_group, groups, length, n_states, n_chunks,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):
        pid_d = tl.program_id(0)
        pid_bg = tl.program_id(1).to(tl.int64)
        b = pid_bg // groups
        g = pid_bg % groups
        dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = dd < dim_per_group
        d = g * dim_per_group + dd  # global channel
        n = tl.arange(0, BLOCK_N)
        mask_n = n < n_states
        mask_dn = mask_d[:, None] & mask_n[None, :]
        # padded d/n lanes load A = 0, delta = 0 and B = 0, so their decay is 1 and drive 0: they stay at 0
        A = tl.load(A_ptr + d[:, None] * n_states + n[None, :], mask=mask_dn, other=0.0)
        row = (b * dim + d) * length  # (BLOCK_D,) offsets of u/delta/y rows
        bc_row = (pid_bg * n_states + n) * length  # (BLOCK_N,) offsets of this group's B/C rows
        steps = tl.arange(0, CHUNK)
        is_last = (steps == CHUNK - 1)[None, None, :]
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        c = 0
        while c < n_chunks:  # not `for ... in range(n_chunks)`: Triton 3.6's interpreter breaks on it with numpy 2.4
            t = c * CHUNK + steps
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]
            tl.store(hs_ptr + ((b * n_chunks + c) * dim + d[:, None]) * n_states + n[None, :], h, mask=mask_dn)
            uu = tl.load(u_ptr + row[:, None] + t[None, :], mask=mask_dt, other=0.0)
            dl = tl.load(delta_ptr + row[:, None] + t[None, :], mask=mask_dt, other=0.0)
            Bt = tl.load(B_ptr + bc_row[:, None] + t[None, :], mask=mask_nt, other=0.0)
            Ct = tl.load(C_ptr + bc_row[:, None] + t[None, :], mask=mask_nt, other=0.0)
            # steps past L have delta = 0: decay 1, drive 0, so the last column holds the state at L-1
            decay = tl.exp(dl[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, CHUNK)
            drive = (dl * uu)[:, None, :] * Bt[None, :, :]
            prod, acc = tl.associative_scan((decay, drive), axis=2, combine_fn=_linear_combine)
            hh = acc + prod * h[:, :, None]
            y = tl.sum(hh * Ct[None, :, :], axis=1)
            tl.store(y_ptr + row[:, None] + t[None, :], y, mask=mask_dt)
            h = tl.sum(tl.where(is_last, hh, 0.0), axis=2)
            c += 1
        tl.store(last_ptr + (b * dim + d[:, None]) * n_states + n[None, :], h, mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, hs_ptr, dy_ptr,  # inputs, fp32 contiguous
        du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,  # dA: (b, dim, N) partials; dB, dC zeroed when ATOMIC
        dim, dim_per_group, groups, length, n_states, n_chunks,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        pid_d = tl.program_id(0)
        pid_bg = tl.program_id(1).to(tl.int64)
        b = pid_bg // groups
        g = pid_bg % groups
        dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = dd < dim_per_group
        d = g * dim_per_group + dd
        n = tl.arange(0, BLOCK_N)
        mask_n = n < n_states
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + d[:, None] * n_states + n[None, :], mask=mask_dn, other=0.0)
        row = (b * dim + d) * length
        bc_row = (pid_bg * n_states + n) * length
        steps = tl.arange(0, CHUNK)
        is_first = (steps == 0)[None, None, :]
        gh_next = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # grad wrt the state at the next chunk's start
        dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        c = n_chunks - 1
        while c >= 0:  # chunks in reverse
            t = c * CHUNK + steps
            mask_t = t < length
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]
            h0 = tl.load(hs_ptr + ((b * n_chunks + c) * dim + d[:, None]) * n_states + n[None, :], mask=mask_dn,
                         other=0.0)
            uu = tl.load(u_ptr + row[:, None] + t[None, :], mask=mask_dt, other=0.0)
            dl = tl.load(delta_ptr + row[:, None] + t[None, :], mask=mask_dt, other=0.0)
            mask_next = mask_d[:, None] & (t + 1 < length)[None, :]
            dl_next = tl.load(delta_ptr + row[:, None] + t[None, :] + 1, mask=mask_next, other=0.0)
            dy = tl.load(dy_ptr + row[:, None] + t[None, :], mask=mask_dt, other=0.0)
            Bt = tl.load(B_ptr + bc_row[:, None] + t[None, :], mask=mask_nt, other=0.0)
            Ct = tl.load(C_ptr + bc_row[:, None] + t[None, :], mask=mask_nt, other=0.0)
            # recompute this chunk's states from its stored start
            decay = tl.exp(dl[:, None, :] * A[:, :, None])
            drive = (dl * uu)[:, None, :] * Bt[None, :, :]
            prod, acc = tl.associative_scan((decay, drive), axis=2, combine_fn=_linear_combine)
            hh = acc + prod * h0[:, :, None]
            # grad_h_t = C_t*dy_t + decay_{t+1}*grad_h_{t+1}; no step follows L-1, so its decay_{t+1} is 0
            decay_next = tl.where((t + 1 < length)[None, None, :], tl.exp(dl_next[:, None, :] * A[:, :, None]), 0.0)
            rprod, racc = tl.associative_scan((decay_next, dy[:, None, :] * Ct[None, :, :]), axis=2,
                                              combine_fn=_linear_combine, reverse=True)
            gh = racc + rprod * gh_next[:, :, None]
            gh_next = tl.sum(tl.where(is_first, gh, 0.0), axis=2)
            # y_t = <C_t, h_t>;  h_t = decay_t*h_{t-1} + delta_t*u_t*B_t
            dC = tl.sum(dy[:, None, :] * hh, axis=0)  # (BLOCK_N, CHUNK), summed over this block's channels
            dB = tl.sum(gh * (dl * uu)[:, None, :], axis=0)
            gB = tl.sum(gh * Bt[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
            g_decay = gh * (hh - drive)  # grad_h_t * decay_t * h_{t-1}, without holding h_{t-1}
            ddl = uu * gB + tl.sum(g_decay * A[:, :, None], axis=1)
            dA_acc += tl.sum(g_decay * dl[:, None, :], axis=2)
            tl.store(du_ptr + row[:, None] + t[None, :], dl * gB, mask=mask_dt)
            tl.store(ddelta_ptr + row[:, None] + t[None, :], ddl, mask=mask_dt)
            if ATOMIC:  # other channel blocks of this group add to the same dB/dC entries
                tl.atomic_add(dB_ptr + bc_row[:, None] + t[None, :], dB, mask=mask_nt)
                tl.atomic_add(dC_ptr + bc_row[:, None] + t[None, :], dC, mask=mask_nt)
            else:
                tl.store(dB_ptr + bc_row[:, None] + t[None, :], dB, mask=mask_nt)
                tl.store(dC_ptr + bc_row[:, None] + t[None, :], dC, mask=mask_nt)
            c -= 1
        tl.store(dA_ptr + (b * dim + d[:, None]) * n_states + n[None, :], dA_acc, mask=mask_dn)


# ---------------------------------------------------------------------------------------------------------------
# launchers and autograd


def _launch_geometry(u: Tensor, B: Tensor, n_states: int, config: TritonScanConfig) -> dict:
    batch, dim, length = u.shape
    groups = B.shape[1]
    dim_per_group = dim // groups
    block_d = min(config.block_d, triton.next_power_of_2(dim_per_group))
    if batch * groups > 65535:  # CUDA's limit on grid axis 1
        raise ValueError(f"selective_scan_triton: batch * groups = {batch * groups} exceeds 65535; split the batch")
    return {
        "grid": (triton.cdiv(dim_per_group, block_d), batch * groups),
        "args": (dim, dim_per_group, groups, length, n_states, triton.cdiv(length, config.chunk)),
        "meta": {"BLOCK_D": block_d, "BLOCK_N": triton.next_power_of_2(n_states), "CHUNK": config.chunk},
    }


def _device_guard(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class _TritonScan(torch.autograd.Function):
    """Core recurrence y_t = <C_t, h_t> on fp32 contiguous tensors; D, softplus, bias and z are handled outside.

    Shapes: u, delta (b, dim, L); A (dim, N); B, C (b, G, N, L). Returns y (b, dim, L) and the last state (b, dim, N).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, config):
        batch, dim, length = u.shape
        n_states = A.shape[1]
        geo = _launch_geometry(u, B, n_states, config)
        n_chunks = geo["args"][-1]
        y = torch.empty_like(u)
        last = u.new_zeros(batch, dim, n_states)
        hs = u.new_empty(batch, n_chunks, dim, n_states)
        if u.numel():
            with _device_guard(u):
                _scan_fwd_kernel[geo["grid"]](u, delta, A, B, C, y, hs, last, *geo["args"], **geo["meta"],
                                              num_warps=config.num_warps_fwd)
        ctx.config = config
        ctx.save_for_backward(u, delta, A, B, C, hs)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, hs = ctx.saved_tensors
        config = ctx.config
        batch, dim, _ = u.shape
        n_states = A.shape[1]
        geo = _launch_geometry(u, B, n_states, config)
        atomic = geo["grid"][0] > 1
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dA = u.new_zeros(batch, dim, n_states)
        dB = torch.zeros_like(B) if atomic else torch.empty_like(B)
        dC = torch.zeros_like(C) if atomic else torch.empty_like(C)
        if u.numel():
            dy = dy.float().contiguous()
            with _device_guard(u):
                _scan_bwd_kernel[geo["grid"]](u, delta, A, B, C, hs, dy, du, ddelta, dA, dB, dC, *geo["args"],
                                              **geo["meta"], ATOMIC=atomic, num_warps=config.num_warps_bwd)
        else:
            dB.zero_()
            dC.zero_()
        return du, ddelta, dA.sum(0), dB, dC, None


def _grouped(M: Tensor, name: str, batch: int, length: int) -> Tensor:
    """B or C as (batch, G, N, L) from (batch, G, N, L) or (batch, N, L)."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    if M.dim() != 4 or M.shape[0] != batch or M.shape[-1] != length:
        raise ValueError(f"selective_scan_triton: {name} must be (batch={batch}, G, N, L={length}) or "
                         f"(batch, N, L), got shape {tuple(M.shape)}")
    return M


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> tuple[Tensor, Tensor]:
    """Validates shapes and devices; returns B and C as (batch, G, N, L)."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan_triton: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan_triton: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan_triton: complex A is not supported")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan_triton: A must be (dim={dim}, N), got shape {tuple(A.shape)}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (dim,):
            raise ValueError(f"selective_scan_triton: {name} must be (dim={dim},), got shape {tuple(vec.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan_triton: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan_triton: {name} is on {t.device}, u on {u.device}")
    Bg, Cg = _grouped(B, "B", batch, length), _grouped(C, "C", batch, length)
    if Bg.shape != Cg.shape:
        raise ValueError(f"selective_scan_triton: B shape {tuple(B.shape)} and C shape {tuple(C.shape)} differ")
    groups, n_states = Bg.shape[1], Bg.shape[2]
    if n_states != A.shape[1]:
        raise ValueError(f"selective_scan_triton: B/C have N={n_states} states, A has {A.shape[1]}")
    if groups == 0 or dim % groups:
        raise ValueError(f"selective_scan_triton: dim {dim} is not divisible by the {groups} groups of B/C")
    return Bg, Cg


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False, *,
                          config: TritonScanConfig | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's signature, computed by Triton kernels in fp32 (forward and backward).

    Args:
        u, delta: (batch, dim, L).  A: (dim, N), real.  B, C: (batch, G, N, L) with dim % G == 0, or (batch, N, L).
        D, delta_bias: (dim,).  z: (batch, dim, L).  config: kernel launch parameters (default
            :data:`DEFAULT_CONFIG`).
    Returns:
        (batch, dim, L) in u's dtype, and the fp32 last state (batch, dim, N) if ``return_last_state``
        (not differentiable, as in mamba-ssm).
    """
    if triton is None:
        raise RuntimeError("selective_scan_triton: triton is not installed (pip install triton)")
    Bg, Cg = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cuda" and not interpreting():
        raise ValueError(f"selective_scan_triton: tensors on {u.device} need CUDA, or TRITON_INTERPRET=1 set before "
                         "ecmnet_core.ops.scan_triton is imported (CPU interpreter, for tests)")
    dtype_in = u.dtype
    uf = u.float()
    dl = delta.float()
    if delta_bias is not None:
        dl = dl + delta_bias.float()[:, None]
    if delta_softplus:
        dl = F.softplus(dl)
    y, last = _TritonScan.apply(uf.contiguous(), dl.contiguous(), A.float().contiguous(), Bg.float().contiguous(),
                                Cg.float().contiguous(), config or DEFAULT_CONFIG)
    if D is not None:
        y = y + D.float()[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
