"""Compiled CPU selective scan: the ``cpp`` backend of :func:`ecmnet_core.ops.selective_scan.selective_scan_fn`.

The kernels live in ``csrc/selective_scan_cpu.cpp`` behind a plain C ABI. On first use the source is compiled with
the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) into a shared library that is loaded with
:mod:`ctypes`; no torch or Python headers are involved, so a build takes seconds, not the ~30 s of a
``torch.utils.cpp_extension`` build. The library is cached under ``$ECMNET_CACHE_DIR/selective_scan_cpu`` (default
``~/.cache/ecmnet/selective_scan_cpu``) under a name that hashes the source, the flags, the compiler and the CPU, so a
``-march=native`` build is never loaded on a different CPU. Builds are atomic (compile to a temporary file, then
rename), so concurrent processes at worst build twice; this machinery is shared with the attention kernel in
:mod:`ecmnet_core.ops.cbuild`. Without a working compiler :func:`load_library` returns None after one warning and the
dispatcher falls back to the ``torch`` backend.

Kernel design (details in the source): SIMD lanes run over a tile of channels of one group (one native vector: 16
with AVX-512, 8 with AVX, else 4), time and states are loops, so the hot loops need no horizontal sums; a per-call
team of ``torch.get_num_threads()`` threads takes the tiles. The forward fuses delta_bias, softplus, D and the z gate.
With gradients it also stores the state at the start of every ``chunk`` steps; the backward runs the reverse-time
recurrence chunk by chunk, recomputing each chunk's states from its stored start, so activation memory is
O(batch * dim * N * L / chunk) on top of the inputs. It returns gradients for u, delta, A, B, C, D, z and
delta_bias; B and C gradients are accumulated per (batch, group, part) and summed here, so no two threads write the
same memory. Without gradients (``torch.no_grad``, inference) no states are stored and no autograd node is built.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ecmnet_core.ops import cbuild

ABI_VERSION = 3
DEFAULT_CHUNK = 64

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_FWD_ARGTYPES = [_P] * 8 + [_INT] + [_I64] * 6 + [_P] * 3 + [_INT]
_BWD_ARGTYPES = [_P] * 8 + [_INT] + [_I64] * 6 + [_P] * 10 + [_I64, _INT]


#: OpenMP first: the kernel then runs on PyTorch's intra-op threads (see csrc: run_tasks).
KERNEL = cbuild.Kernel("selective_scan_cpu", "ecmnet_scan_abi_version", ABI_VERSION, {
    "ecmnet_scan_fwd": (_FWD_ARGTYPES, _INT), "ecmnet_scan_bwd": (_BWD_ARGTYPES, _INT),
    "ecmnet_scan_lanes": (None, _INT)},
    what="compiled CPU selective scan", extra_flags=("-fopenmp",))


load_library = KERNEL.load


@torch.compiler.assume_constant_result  # torch.compile: decide once at trace time, no graph break
def is_available() -> bool:
    """True when the compiled kernel can be used (builds it on first call)."""
    return load_library() is not None


# ---------------------------------------------------------------------------------------------------------------
# autograd


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_ERRORS = {1: "invalid sizes", 2: "dim not divisible by the groups", 3: "invalid number of parts",
           4: "z without a gradient buffer", 5: "out of memory"}


def _check(code: int, what: str) -> None:
    cbuild.check_status(code, f"selective-scan kernel {what}", _ERRORS)


def _forward(lib, u, delta, A, Bt, Ct, D, z, delta_bias, softplus, chunk, store_states):
    batch, dim, length = u.shape
    groups, n = Bt.shape[1], A.shape[1]
    out = torch.empty_like(u)
    last = u.new_empty(batch, dim, n)
    n_chunks = -(-length // chunk)
    states = u.new_empty(batch, dim, n_chunks, n) if store_states else None
    code = lib.ecmnet_scan_fwd(u.data_ptr(), delta.data_ptr(), A.data_ptr(), Bt.data_ptr(), Ct.data_ptr(), _ptr(D),
                               _ptr(z), _ptr(delta_bias), int(softplus), batch, dim, groups, length, n, chunk,
                               out.data_ptr(), last.data_ptr(), _ptr(states), torch.get_num_threads())
    _check(code, "forward")
    return out, last, states


class _CpuScan(torch.autograd.Function):
    """Whole scan (bias, softplus, recurrence, D, z) on contiguous fp32 tensors; B and C time-major (b, G, L, N)."""

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct, D, z, delta_bias, softplus, chunk):
        lib = load_library()
        out, last, states = _forward(lib, u, delta, A, Bt, Ct, D, z, delta_bias, softplus, chunk, True)
        ctx.softplus, ctx.chunk = softplus, chunk
        ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, delta_bias, states)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlast):
        u, delta, A, Bt, Ct, D, z, delta_bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n = Bt.shape[1], A.shape[1]
        threads = torch.get_num_threads()
        # Enough (batch, group, part) tasks to keep every thread busy; each part owns its dB/dC buffers and
        # takes whole tiles (one SIMD vector of channels each).
        lib = load_library()
        tiles = -(-(dim // groups) // lib.ecmnet_scan_lanes())
        parts = max(1, min(tiles, math.ceil(2 * threads / max(1, batch * groups))))
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA = torch.empty(batch, dim, n, dtype=torch.float64)
        dB = u.new_empty(batch, groups, parts, length, n)
        dC = u.new_empty(batch, groups, parts, length, n)
        dD = torch.empty(batch, dim, dtype=torch.float64) if D is not None else None
        dbias = torch.empty(batch, dim, dtype=torch.float64) if delta_bias is not None else None
        dz = torch.empty_like(z) if z is not None else None
        dout = dout.float().contiguous()  # keep a reference: the kernel reads through its raw pointer
        code = lib.ecmnet_scan_bwd(
            u.data_ptr(), delta.data_ptr(), A.data_ptr(), Bt.data_ptr(), Ct.data_ptr(), _ptr(D), _ptr(z),
            _ptr(delta_bias), int(ctx.softplus), batch, dim, groups, length, n, ctx.chunk, states.data_ptr(),
            dout.data_ptr(), du.data_ptr(), ddelta.data_ptr(), dA.data_ptr(), dB.data_ptr(), dC.data_ptr(), _ptr(dD),
            _ptr(dbias), _ptr(dz), parts, threads)
        _check(code, "backward")
        dD = dD.sum(0).float() if dD is not None else None
        dbias = dbias.sum(0).float() if dbias is not None else None
        dB, dC = (dB.sum(2), dC.sum(2)) if parts > 1 else (dB.squeeze(2), dC.squeeze(2))
        return (du, ddelta, dA.sum(0).float(), dB, dC, dD, dz, dbias, None, None)


# ---------------------------------------------------------------------------------------------------------------
# entry point


def _grouped(M: Tensor, name: str, batch: int, length: int, n: int) -> Tensor:
    if M.dim() == 3:
        M = M.unsqueeze(1)
    if M.dim() != 4 or M.shape[0] != batch or M.shape[2] != n or M.shape[3] != length:
        raise ValueError(f"selective scan: {name} must be (batch, N, L) or (batch, G, N, L) = "
                         f"({batch}, G, {n}, {length}), got {tuple(M.shape)}")
    return M


def _vector(v: Tensor | None, name: str, dim: int) -> Tensor | None:
    if v is None:
        return None
    if v.shape != (dim,):
        raise ValueError(f"selective scan: {name} must be ({dim},), got {tuple(v.shape)}")
    return v.float().contiguous()


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False, *, chunk: int = DEFAULT_CHUNK):
    """Selective scan with the compiled kernel; same signature and semantics as ``selective_scan_fn``.

    Args:
        u, delta: (batch, dim, L).  A: (dim, N), real.  B, C: (batch, G, N, L) or (batch, N, L), dim % G == 0.
        D, delta_bias: (dim,).  z: (batch, dim, L).  chunk: steps between stored states (backward memory/speed).
    Returns:
        (batch, dim, L) in u's dtype, and the last state (batch, dim, N) fp32 if ``return_last_state``.
    Raises:
        RuntimeError if the library cannot be built (callers normally go through the dispatcher, which falls back).
    """
    if not is_available():
        raise RuntimeError(f"compiled CPU selective scan unavailable: {KERNEL.error}")
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"selective-scan backend 'cpp' needs CPU tensors; {name} is on {t.device}")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective scan: u and delta must both be (batch, dim, L), got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be ({dim}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    Bg, Cg = _grouped(B, "B", batch, length, n), _grouped(C, "C", batch, length, n)
    groups = Bg.shape[1]
    if groups < 1 or Cg.shape[1] != groups or dim % groups:
        raise ValueError(f"selective scan: dim {dim} must be divisible by the groups of B ({groups}) and C "
                         f"({Cg.shape[1]}), which must match")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective scan: z must be {tuple(u.shape)}, got {tuple(z.shape)}")
    if chunk < 1:
        raise ValueError(f"selective scan: chunk must be >= 1, got {chunk}")
    dtype_in = u.dtype
    args = (u.float().contiguous(), delta.float().contiguous(), A.float().contiguous(),
            Bg.float().transpose(-1, -2).contiguous(), Cg.float().transpose(-1, -2).contiguous(),
            _vector(D, "D", dim), z.float().contiguous() if z is not None else None,
            _vector(delta_bias, "delta_bias", dim))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        out, last = _CpuScan.apply(*args, bool(delta_softplus), int(chunk))
    elif not return_last_state:  # inference: no stored states, no autograd node; a custom op for torch.compile
        out, last = scan_infer_op(*args, bool(delta_softplus)), None
    else:
        out, last, _ = _forward(load_library(), *args, bool(delta_softplus), int(chunk), False)
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out


@torch.library.custom_op("ecmnet::selective_scan_cpu", mutates_args=())
def scan_infer_op(u: Tensor, delta: Tensor, A: Tensor, Bt: Tensor, Ct: Tensor, D: Tensor | None, z: Tensor | None,
                  delta_bias: Tensor | None, softplus: bool) -> Tensor:
    """The inference scan as ``torch.ops.ecmnet.selective_scan_cpu`` (contiguous fp32 inputs, B/C time-major), so
    that torch.compile keeps it as one opaque node of its graph."""
    out, _, _ = _forward(load_library(), u, delta, A, Bt, Ct, D, z, delta_bias, softplus, DEFAULT_CHUNK, False)
    return out


@scan_infer_op.register_fake
def _(u, delta, A, Bt, Ct, D, z, delta_bias, softplus):
    return torch.empty_like(u)
