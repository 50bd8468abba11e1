"""Compiled CPU inference kernels for EDAB and BNPReLU (fp32, channels last, no autograd).

The kernels (``csrc/edab_cpu.cpp``, plain C ABI) replace chains of small PyTorch ops that each read and write a
whole feature map:

* :func:`dw_pair_cpu` -- a depthwise pair PReLU(dw1x3(PReLU(dw3x1(x)))) in one pass (a row buffer in cache), with
  the per-channel means ECA pools; four convolutions and PReLUs per EDAB become two calls;
* :func:`edab_merge_cpu` -- EDAB's three-path sum with ECA's weights, then its eval-mode ``bn_prelu_out``;
* :func:`add_shuffle_cpu` -- EDAB's residual add and channel shuffle;
* :func:`affine_prelu_cpu` -- an eval-mode BatchNorm + PReLU (every :class:`~ecmnet_core.model.layers.BNPReLU`).

Batch norms must be folded or packed beforehand (:func:`ecmnet_core.model.fuse.optimize_for_inference`). Built on
first use and cached like the other kernels (:mod:`ecmnet_core.ops.cbuild`, cache directory ``edab_cpu``); without a
compiler :func:`is_available` is False and the model runs its PyTorch layers. Each is also a torch custom op
(``torch.ops.ecmnet.*``, :mod:`ecmnet_core.ops.op_registry`), so TorchScript traces and ``torch.compile`` keep it
as one call.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ecmnet_core.ops import cbuild
from ecmnet_core.ops.op_registry import cpu_inference_op, empty_nhwc, nhwc_memory

ABI_VERSION = 1

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_ARGTYPES = [_P] * 3 + [_I64] * 4 + [_P, _I64, _I64, ctypes.c_int]

_MERGE_ARGTYPES = [_P] * 5 + [ctypes.c_float, _P] + [_I64] * 3 + [_P, ctypes.c_int]
_SHUFFLE_ARGTYPES = [_P] * 3 + [_I64] * 3 + [ctypes.c_int]

#: OpenMP build: the kernel runs on PyTorch's intra-op threads.
KERNEL = cbuild.Kernel("edab_cpu", "ecmnet_edab_abi_version", ABI_VERSION, {
    "ecmnet_dw_pair": (_ARGTYPES, ctypes.c_int), "ecmnet_dw_pair_lanes": (None, ctypes.c_int),
    "ecmnet_edab_merge": (_MERGE_ARGTYPES, ctypes.c_int), "ecmnet_add_shuffle": (_SHUFFLE_ARGTYPES, ctypes.c_int),
    "ecmnet_affine_prelu": ([_P, _P, _I64, _I64, _P, ctypes.c_int], ctypes.c_int)},
    what="compiled CPU EDAB kernels", extra_flags=("-fopenmp",))


load_library = KERNEL.load


@torch.compiler.assume_constant_result
def is_available() -> bool:
    """True when the compiled kernel can be used (builds it on first call)."""
    return load_library() is not None


def usable(x: Tensor) -> bool:
    """True when the kernels can run on ``x``: fp32 CPU channels-last, not while exporting ONNX, library built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.onnx.is_in_onnx_export()
            and is_available())


def pack_params(w1: Tensor, b1: Tensor, a1: Tensor, w2: Tensor, b2: Tensor, a2: Tensor) -> Tensor:
    """The kernel's (10, C) parameter block from the two depthwise convolutions (weights (C, 1, 3, 1) and
    (C, 1, 1, 3), biases (C,)) and their PReLU slopes ((C,) or one shared slope)."""
    c = b1.numel()
    for name, t, n in (("w1", w1, 3 * c), ("w2", w2, 3 * c), ("b2", b2, c)):
        if t.numel() != n:
            raise ValueError(f"dw_pair_cpu: {name} has {t.numel()} values, expected {n} for {c} channels")
    for name, t in (("a1", a1), ("a2", a2)):
        if t.numel() not in (1, c):
            raise ValueError(f"dw_pair_cpu: PReLU slope {name} has {t.numel()} values, expected 1 or {c}")
    rows = [w1.reshape(c, 3).t(), b1.reshape(1, c), a1.reshape(-1).expand(c).reshape(1, c), w2.reshape(c, 3).t(),
            b2.reshape(1, c), a2.reshape(-1).expand(c).reshape(1, c)]
    return torch.cat([r.detach().float() for r in rows]).contiguous()


def dw_pair_cpu(x: Tensor, params: Tensor, d1: int, d2: int, want_mean: bool = False) -> tuple[Tensor, Tensor]:
    """``PReLU_a2(b2 + dw1x3_d2(PReLU_a1(b1 + dw3x1_d1(x))))`` and, with ``want_mean``, its per-channel mean.

    Args:
        x: (B, C, H, W) fp32 CPU; channels_last avoids a copy.
        params: (10, C) from :func:`pack_params`; d1, d2: row and column dilations (>= 1, padding = dilation).
    Returns:
        ((B, C, H, W) channels_last output, (B, C) means over H x W -- zeros when not ``want_mean``).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        raise ValueError(f"dw_pair_cpu needs a (B, C, H, W) float32 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    b, c, h, w = x.shape
    if params.shape != (10, c) or params.dtype != torch.float32 or not params.is_contiguous():
        raise ValueError(f"dw_pair_cpu: params must be a contiguous float32 (10, {c}) tensor from pack_params, got "
                         f"{params.dtype} {tuple(params.shape)}")
    lib = _library()
    xc = nhwc_memory(x)
    out = empty_nhwc(b, c, h, w, like=x)
    sums = torch.zeros(b, c, dtype=torch.float32)
    code = lib.ecmnet_dw_pair(xc.data_ptr(), out.data_ptr(), sums.data_ptr() if want_mean else None,
                              b, h, w, c, params.data_ptr(), int(d1), int(d2), torch.get_num_threads())
    _check(code, "depthwise pair")
    return out, sums.div_(float(h * w)) if want_mean else sums


def _nhwc(t: Tensor, name: str, like: Tensor | None = None) -> Tensor:
    """A checked (B, C, H, W) fp32 CPU tensor in channels-last memory (itself when it already is)."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) float32 CPU tensor, got {t.dtype} {tuple(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return nhwc_memory(t)


def _library() -> ctypes.CDLL:
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"compiled CPU EDAB kernels unavailable: {KERNEL.error}")
    return lib


def _check(code: int, what: str) -> None:
    cbuild.check_status(code, f"{what} kernel")


def pack_merge_params(bn: torch.nn.BatchNorm2d, prelu_weight: Tensor) -> Tensor:
    """(3, C) scale, shift, PReLU slope of an eval-mode BatchNorm + PReLU (EDAB's ``bn_prelu_out``)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    c = scale.numel()
    return torch.stack([scale, shift, prelu_weight.reshape(-1).expand(c)]).detach().float().contiguous()


def edab_merge_cpu(f: Tensor, t1: Tensor, e: Tensor, t2: Tensor, att: Tensor, gamma: Tensor, params: Tensor
                   ) -> Tensor:
    """``PReLU_a(scale * (f + e * t1 + t2 + gamma * att) + shift)``: (B, C, H, W) f, t1, t2, att; ECA weights e
    (B, C); DDA's one-element gamma; params (3, C) from :func:`pack_merge_params` -> (B, C, H, W) channels_last."""
    fc = _nhwc(f, "f")
    t1c, t2c, ac = _nhwc(t1, "t1", f), _nhwc(t2, "t2", f), _nhwc(att, "att", f)
    b, c, h, w = f.shape
    ec = e.detach().float().reshape(b, c).contiguous()
    if params.shape != (3, c) or params.dtype != torch.float32 or not params.is_contiguous():
        raise ValueError(f"edab_merge: params must be a contiguous float32 (3, {c}) tensor, got {tuple(params.shape)}")
    y = empty_nhwc(b, c, h, w, like=f)
    _check(_library().ecmnet_edab_merge(fc.data_ptr(), t1c.data_ptr(), ec.data_ptr(), t2c.data_ptr(), ac.data_ptr(),
                                        float(gamma), y.data_ptr(), b, h * w, c, params.data_ptr(),
                                        torch.get_num_threads()), "EDAB merge")
    return y


def add_shuffle_cpu(u: Tensor, v: Tensor, groups: int) -> Tensor:
    """``channel_shuffle(u + v, groups)`` in one pass: (B, C, H, W) -> (B, C, H, W) channels_last."""
    uc, vc = _nhwc(u, "u"), _nhwc(v, "v", u)
    b, c, h, w = u.shape
    z = empty_nhwc(b, c, h, w, like=u)
    _check(_library().ecmnet_add_shuffle(uc.data_ptr(), vc.data_ptr(), z.data_ptr(), b * h * w, c, int(groups),
                                         torch.get_num_threads()), "add + channel shuffle")
    return z


def affine_prelu_cpu(x: Tensor, params: Tensor) -> Tensor:
    """Eval-mode BatchNorm + PReLU, ``PReLU_a(scale * x + shift)``, params (3, C) from :func:`pack_merge_params`:
    (B, C, H, W) -> (B, C, H, W) channels_last."""
    xc = _nhwc(x, "x")
    b, c, h, w = x.shape
    if params.shape != (3, c) or params.dtype != torch.float32 or not params.is_contiguous():
        raise ValueError(f"bn_prelu: params must be a contiguous float32 (3, {c}) tensor, got {tuple(params.shape)}")
    y = empty_nhwc(b, c, h, w, like=x)
    _check(_library().ecmnet_affine_prelu(xc.data_ptr(), y.data_ptr(), b * h * w, c, params.data_ptr(),
                                          torch.get_num_threads()), "BatchNorm + PReLU")
    return y


@cpu_inference_op("affine_prelu_cpu", "(Tensor x, Tensor params) -> Tensor",
                  lambda x, params: empty_nhwc(*x.shape, like=x))
def affine_prelu_op(x: Tensor, params: Tensor) -> Tensor:
    """:func:`affine_prelu_cpu` as ``torch.ops.ecmnet.affine_prelu_cpu`` (no autograd)."""
    return affine_prelu_cpu(x, params)


@cpu_inference_op("edab_merge_cpu",
                  "(Tensor f, Tensor t1, Tensor e, Tensor t2, Tensor att, Tensor gamma, Tensor params) -> Tensor",
                  lambda f, t1, e, t2, att, gamma, params: empty_nhwc(*f.shape, like=f))
def edab_merge_op(f: Tensor, t1: Tensor, e: Tensor, t2: Tensor, att: Tensor, gamma: Tensor, params: Tensor
                  ) -> Tensor:
    """:func:`edab_merge_cpu` as ``torch.ops.ecmnet.edab_merge_cpu`` (no autograd)."""
    return edab_merge_cpu(f, t1, e, t2, att, gamma, params)


@cpu_inference_op("add_shuffle_cpu", "(Tensor u, Tensor v, int groups) -> Tensor",
                  lambda u, v, groups: empty_nhwc(*u.shape, like=u))
def add_shuffle_op(u: Tensor, v: Tensor, groups: int) -> Tensor:
    """:func:`add_shuffle_cpu` as ``torch.ops.ecmnet.add_shuffle_cpu`` (no autograd)."""
    return add_shuffle_cpu(u, v, groups)


@cpu_inference_op("dw_pair_cpu", "(Tensor x, Tensor params, int d1, int d2, bool want_mean) -> (Tensor, Tensor)",
                  lambda x, params, d1, d2, want_mean: (empty_nhwc(*x.shape, like=x), x.new_empty(x.shape[:2])))
def dw_pair_op(x: Tensor, params: Tensor, d1: int, d2: int, want_mean: bool) -> tuple[Tensor, Tensor]:
    """:func:`dw_pair_cpu` as ``torch.ops.ecmnet.dw_pair_cpu`` (recorded as one op by traces; no autograd)."""
    return dw_pair_cpu(x, params, d1, d2, want_mean)


__all__ = ["ABI_VERSION", "KERNEL", "add_shuffle_cpu", "add_shuffle_op", "affine_prelu_cpu",
           "affine_prelu_op", "dw_pair_cpu", "dw_pair_op", "edab_merge_cpu", "edab_merge_op", "is_available",
           "load_library", "pack_merge_params", "pack_params", "usable"]
