"""Selective scan (Mamba S6) with mamba-ssm's ``selective_scan_fn`` signature and several backends.

Semantics, per batch b, channel d and state n (channel d uses group ``d // (dim / G)`` of B and C)::

    delta = softplus(delta + delta_bias)            # when delta_softplus
    h_t   = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B[t, n] * u_t
    y_t   = sum_n C[t, n] * h_t + D[d] * u_t
    out   = y * silu(z)                              # when z is given

Backends:

* ``mamba``: mamba-ssm's CUDA kernel (CUDA tensors, mamba-ssm installed).
* ``triton``: our Triton kernel for CUDA tensors (:mod:`ecmnet_core.ops.scan_triton`), for GPUs without a
  mamba-ssm build.
* ``cpp``: compiled C++ kernel for CPU tensors (:mod:`ecmnet_core.ops.selective_scan_cpu`), built on first use with the
  system compiler; when it cannot be built, a warning is issued once and ``torch`` is used instead.
* ``torch``: pure PyTorch, chunked time-major recurrence with a hand-written backward that recomputes
  states per chunk. Memory is O(B*D*N*(L/chunk + chunk)); it never holds a (B, D, L, N) tensor.
* ``reference``: the plain sequential recurrence with autograd; slow, used by tests as ground truth.

The backend is chosen by the ``backend`` argument, else the ``ECMNET_SCAN_BACKEND`` environment variable,
else automatically: on CUDA ``mamba`` when importable, then ``triton``; on CPU ``cpp`` when it builds;
otherwise ``torch``.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ecmnet_core.ops import scan_triton, selective_scan_cpu

ENV_VAR = "ECMNET_SCAN_BACKEND"
BACKENDS = ("mamba", "triton", "cpp", "torch", "reference")
DEFAULT_CHUNK = 64


@functools.cache
def _mamba_fn():
    """mamba-ssm's selective_scan_fn, or None when mamba-ssm (with its CUDA extension) is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a broken build whose extension fails to load
        return None
    return selective_scan_fn


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and _mamba_fn() is not None:
        names.append("mamba")
    if device.type == "cuda" and scan_triton.triton_available():
        names.append("triton")
    if device.type == "cpu" and selective_scan_cpu.is_available():
        names.append("cpp")
    names += ["torch", "reference"]
    return names


def resolve_backend(backend: str | None = None, device: torch.device | str = "cpu") -> str:
    """Turn ``backend`` (or the environment variable, or ``auto``) into a concrete backend name."""
    name = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    device = torch.device(device)
    if name == "auto":
        return available_backends(device)[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r} (from {'argument' if backend else ENV_VAR}); "
                         f"choose one of auto, {', '.join(BACKENDS)}")
    if name == "mamba":
        if device.type != "cuda":
            raise ValueError("selective-scan backend 'mamba' needs CUDA tensors")
        if _mamba_fn() is None:
            raise ValueError("selective-scan backend 'mamba' requested but mamba-ssm is not installed "
                             "(pip install 'ecmnet[mamba]' on a CUDA machine)")
    if name == "triton":
        if device.type != "cuda" and not scan_triton.interpreting():
            raise ValueError(f"selective-scan backend 'triton' needs CUDA tensors, got {device} "
                             "(or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
        if not scan_triton.triton_available():
            raise ValueError("selective-scan backend 'triton' requested but triton is not installed "
                             "(pip install 'ecmnet_ros[triton]')")
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"selective-scan backend 'cpp' needs CPU tensors, got {device}")
        if not selective_scan_cpu.is_available():  # the loader has warned once; fall back
            return "torch"
    return name


def _grouped(M: Tensor, batch: int, dim: int) -> Tensor:
    """B or C as (batch, G, N, L): accepts (dim, N) constant, (batch, N, L) and (batch, G, N, L)."""
    if M.dim() == 4:
        return M
    if M.dim() == 3:
        return M.unsqueeze(1)
    if M.dim() == 2:  # time-invariant, one row per channel: G = dim groups of one channel
        raise ValueError("time-invariant (dim, N) B/C is not supported; pass (batch, G, N, L)")
    raise ValueError(f"B/C must be 3-D or 4-D, got shape {tuple(M.shape)}")


def _prepare(u: Tensor, delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor]:
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# reference: sequential recurrence, autograd through the loop


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The plain recurrence, one step at a time, in the dtype of ``u`` promoted to at least fp32.

    Holds only the (batch, dim, N) state, so it also works for long L; autograd records every step.
    """
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, length = u.shape
    u, delta = u.to(work), delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bg, Cg = _grouped(B, batch, dim).to(work), _grouped(C, batch, dim).to(work)
    groups = Bg.shape[1]
    Bc = Bg.repeat_interleave(dim // groups, dim=1)  # (batch, dim, N, L)
    Cc = Cg.repeat_interleave(dim // groups, dim=1)
    A = A.to(work)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind, not x[..., t]: the backward of L index ops would write L full-size zero tensors (O(L^2))
    for dt, ut, bt, ct in zip(delta.unbind(-1), u.unbind(-1), Bc.unbind(-1), Cc.unbind(-1)):
        dt = dt[..., None]
        h = torch.exp(dt * A) * h + dt * bt * ut[..., None]
        ys.append((h * ct).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(work)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_scan_textbook(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's ``selective_scan_ref`` algorithm: materialise exp(dA) and dB*u as (B, D, L, N), then loop.

    Only used by ``bench scan`` as the baseline the issue compares against; O(B*D*L*N) memory.
    """
    dtype_in = u.dtype
    batch, dim, length = u.shape
    u, delta = _prepare(u, delta, delta_bias, delta_softplus)
    Bg, Cg = _grouped(B, batch, dim).float(), _grouped(C, batch, dim).float()
    groups = Bg.shape[1]
    Bc = Bg.repeat_interleave(dim // groups, dim=1)
    Cc = Cg.repeat_interleave(dim // groups, dim=1)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    delta_bu = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bc, u)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = delta_a[:, :, t] * h + delta_bu[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", h, Cc[:, :, :, t]))
    y = torch.stack(ys, dim=2)
    return _finish(y, u, D, z, dtype_in)


# ---------------------------------------------------------------------------------------------------------------
# torch: chunked time-major recurrence with its own backward


def _chunk_terms(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, t0: int, t1: int) -> tuple[Tensor, Tensor]:
    """exp(delta*A) and delta*B*u for steps [t0, t1), time-major: (T, batch, G, Dg, N), contiguous."""
    batch, groups, dg, _ = u.shape
    dl = delta[..., t0:t1]  # (b, G, Dg, T)
    decay = torch.exp(dl.unsqueeze(-1) * A[None, :, :, None, :])  # (b, G, Dg, T, N)
    drive = (dl * u[..., t0:t1]).unsqueeze(-1) * B[:, :, None, :, t0:t1].transpose(-1, -2)
    return decay.permute(3, 0, 1, 2, 4).contiguous(), drive.permute(3, 0, 1, 2, 4).contiguous()


def _run_chunk(decay: Tensor, drive: Tensor, h0: Tensor) -> Tensor:
    """States of one chunk, in place in ``drive``: hs[i] = decay[i] * hs[i-1] + drive[i], hs[-1] = h0."""
    hs = drive
    hs[0].addcmul_(decay[0], h0)
    for i in range(1, hs.shape[0]):
        hs[i].addcmul_(decay[i], hs[i - 1])
    return hs


class _ChunkedScan(torch.autograd.Function):
    """Core recurrence y_t = <C_t, h_t> on grouped tensors; D, softplus and z are handled by autograd outside.

    Shapes: u, delta (b, G, Dg, L); A (G, Dg, N); B, C (b, G, N, L). Returns y (b, G, Dg, L) and h_L.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        batch, groups, dg, length = u.shape
        n = A.shape[-1]
        y = u.new_empty(batch, groups, dg, length)
        h = u.new_zeros(batch, groups, dg, n)
        starts = []
        for t0 in range(0, length, chunk):
            t1 = min(t0 + chunk, length)
            starts.append(h)
            decay, drive = _chunk_terms(u, delta, A, B, t0, t1)
            hs = _run_chunk(decay, drive, h)
            y[..., t0:t1] = torch.einsum("tbgdn,bgnt->bgdt", hs, C[..., t0:t1])
            h = hs[-1].clone()
        ctx.chunk = chunk
        h_starts = torch.stack(starts) if starts else h.unsqueeze(0)
        ctx.save_for_backward(u, delta, A, B, C, h_starts)
        ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, h_starts = ctx.saved_tensors
        chunk = ctx.chunk
        length = u.shape[-1]
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dB = torch.empty_like(B)
        dC = torch.empty_like(C)
        dA = torch.zeros_like(A)
        dy = dy.contiguous()
        carry = None  # decay[t+1] * grad_h[t+1] flowing into the last step of the current chunk
        chunk_starts = list(range(0, length, chunk))
        for idx in range(len(chunk_starts) - 1, -1, -1):
            t0 = chunk_starts[idx]
            t1 = min(t0 + chunk, length)
            h0 = h_starts[idx]
            decay, drive = _chunk_terms(u, delta, A, B, t0, t1)
            hs = _run_chunk(decay, drive, h0)
            dyc = dy[..., t0:t1]
            Cc, Bc = C[..., t0:t1], B[..., t0:t1]
            dC[..., t0:t1] = torch.einsum("bgdt,tbgdn->bgnt", dyc, hs)
            # grad_h[t] = dy_t * C_t + decay[t+1] * grad_h[t+1], in place
            gh = (dyc.unsqueeze(-1) * Cc[:, :, None].transpose(-1, -2)).permute(3, 0, 1, 2, 4).contiguous()
            if carry is not None:
                gh[-1] += carry
            for i in range(gh.shape[0] - 2, -1, -1):
                gh[i].addcmul_(decay[i + 1], gh[i + 1])
            carry = decay[0] * gh[0]
            h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0)
            dl, uc = delta[..., t0:t1], u[..., t0:t1]
            # drive = delta * u * B
            s = torch.einsum("tbgdn,bgnt->bgdt", gh, Bc)
            du[..., t0:t1] = dl * s
            dB[..., t0:t1] = torch.einsum("tbgdn,bgdt->bgnt", gh, dl * uc)
            # decay = exp(delta * A): d decay = grad_h * h_prev
            g_decay = gh.mul_(h_prev).mul_(decay)  # reuse gh's storage; gh is not needed any more
            ddelta[..., t0:t1] = uc * s + torch.einsum("tbgdn,gdn->bgdt", g_decay, A)
            dA += torch.einsum("tbgdn,bgdt->gdn", g_decay, dl)
        return du, ddelta, dA, dB, dC, None


def _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk=DEFAULT_CHUNK):
    dtype_in = u.dtype
    batch, dim, length = u.shape
    u, delta = _prepare(u, delta, delta_bias, delta_softplus)
    Bg, Cg = _grouped(B, batch, dim).float(), _grouped(C, batch, dim).float()
    groups = Bg.shape[1]
    if dim % groups:
        raise ValueError(f"dim {dim} is not divisible by the {groups} groups of B/C")
    dg, n = dim // groups, A.shape[1]
    y, last = _ChunkedScan.apply(
        u.view(batch, groups, dg, length), delta.view(batch, groups, dg, length),
        A.float().view(groups, dg, n), Bg.contiguous(), Cg.contiguous(), chunk,
    )
    out = _finish(y.view(batch, dim, length), u, D, z, dtype_in)
    return (out, last.reshape(batch, dim, n)) if return_last_state else out


def _scan_mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    fn = _mamba_fn()
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


# ---------------------------------------------------------------------------------------------------------------
# ONNX export: the recurrence as one ONNX ``Scan`` node

#: Domain and name of the placeholder node that :func:`ecmnet_core.engines.export.export_onnx` rewrites into an
#: ONNX Scan.
RECURRENCE_OP = ("ecmnet", "Recurrence")


def _recurrence_loop(h0: Tensor, dA: Tensor, dBu: Tensor, C: Tensor) -> Tensor:
    """h_t = dA_t * h_{t-1} + dBu_t, y_t = h_t @ C_t. h0 (B, G, Dg, N); dA, dBu (L, B, G, Dg, N); C (L, B, G, N, 1)
    -> y (L, B, G, Dg, 1)."""
    h = h0
    ys: list[Tensor] = []
    for t in range(dA.shape[0]):
        h = dA[t] * h + dBu[t]
        ys.append(torch.matmul(h, C[t]))
    return torch.stack(ys)


class _RecurrenceForExport(torch.autograd.Function):
    """The recurrence as one placeholder node while exporting; the exporter turns it into an ONNX ``Scan`` whose
    body is Mul, Add, MatMul (:func:`ecmnet_core.engines.export.lower_recurrence`), so the graph does not grow with L
    and ONNX Runtime steps through time without per-step graph overhead."""

    @staticmethod
    def forward(ctx, h0: Tensor, dA: Tensor, dBu: Tensor, C: Tensor) -> Tensor:
        return _recurrence_loop(h0, dA, dBu, C)

    @staticmethod
    def symbolic(g, h0, dA, dBu, C):
        return g.op(f"{RECURRENCE_OP[0]}::{RECURRENCE_OP[1]}", h0, dA, dBu, C)


def selective_scan_export(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The scan as exported to ONNX: element-wise terms for all steps at once, then one ``Scan`` over time.

    Holds exp(delta * A) and delta * B * u as (L, batch, dim, N) tensors (45 MB at a 360x480 input, L = 690).
    Same semantics as :func:`selective_scan_ref`; used while ``torch.onnx.export`` runs.
    """
    batch, dim, length = u.shape
    u, delta = _prepare(u, delta, delta_bias, delta_softplus)
    Bg, Cg = _grouped(B, batch, dim).float(), _grouped(C, batch, dim).float()
    groups, n = Bg.shape[1], A.shape[1]
    per = dim // groups
    dt = delta.permute(2, 0, 1).reshape(length, batch, groups, per, 1)  # (L, B, G, Dg, 1)
    ut = u.permute(2, 0, 1).reshape(length, batch, groups, per, 1)
    dA = torch.exp(dt * A.float().reshape(1, 1, groups, per, n))
    dBu = (dt * ut) * Bg.permute(3, 0, 1, 2).unsqueeze(3)  # B_t broadcast over the group's channels
    Ct = Cg.permute(3, 0, 1, 2).unsqueeze(-1)  # (L, B, G, N, 1)
    h0 = torch.zeros(batch, groups, per, n, dtype=dA.dtype, device=dA.device)
    y = _RecurrenceForExport.apply(h0, dA, dBu, Ct).reshape(length, batch, dim).permute(1, 2, 0)
    return _finish(y, u, D, z, torch.float32)


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                      z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, *, backend: str | None = None):
    """Selective scan with mamba-ssm's signature; ``backend`` overrides the automatic choice.

    Args:
        u, delta: (batch, dim, L).  A: (dim, N), real.  B, C: (batch, G, N, L) or (batch, N, L).
        D, delta_bias: (dim,).  z: (batch, dim, L).
    Returns:
        (batch, dim, L) in u's dtype, and the last state (batch, dim, N) if ``return_last_state``.
    """
    if A.is_complex():
        raise ValueError("complex A is not supported")
    if torch.onnx.is_in_onnx_export() and not return_last_state:
        return selective_scan_export(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)
    name = resolve_backend(backend, u.device)
    if _exporting():
        # A TorchScript trace records the inference kernel as the custom op torch.ops.ecmnet.selective_scan_cpu;
        # it cannot hold the custom autograd.Functions, so anything else traces the plain loop (and unrolls it).
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z))
        if name == "cpp" and torch.jit.is_tracing() and not grad and not return_last_state:
            return selective_scan_cpu.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "mamba":
        return _scan_mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "triton":
        return scan_triton.selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                 return_last_state)
    if name == "cpp":
        return selective_scan_cpu.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                     return_last_state)
    if name == "torch":
        return _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
