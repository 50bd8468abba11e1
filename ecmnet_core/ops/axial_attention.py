"""DDA's axial softmax attention with two backends, chosen per call.

Semantics, with q, k (B, dk, H, W) and v (B, C, H, W)::

    O_h[:, :, i, w] = sum_j softmax_j(scale * q[:, :, i, w] . k[:, :, j, w]) v[:, :, j, w]   (along each column)
    O_w[:, :, h, i] = sum_j softmax_j(scale * q[:, :, h, i] . k[:, :, h, j]) v[:, :, h, j]   (along each row)
    result = O_h + O_w

Backends:

* ``torch``: batched matmuls and softmax; differentiable, any device and dtype, traceable and ONNX-exportable.
* ``cpp``: the compiled CPU kernels, fp32 CPU tensors: without autograd the inference kernel
  (:mod:`ecmnet_core.ops.axial_attention_cpu`), with autograd its forward plus a compiled backward
  (:mod:`ecmnet_core.ops.axial_attention_backward_cpu`).

Choice: the ``backend`` argument (DDA passes its ``backend`` attribute), else the ``ECMNET_ATTENTION_BACKEND``
environment variable (``torch``, ``cpp`` or ``auto``), else ``auto``. ``auto`` picks ``cpp`` for fp32 CPU tensors
when nothing is being scripted or ONNX-exported and the libraries build (a TorchScript trace or ``torch.compile``
records the inference kernel as the custom op ``torch.ops.ecmnet.axial_attention_cpu``; with autograd, a trace or
autocast uses ``torch``); ``torch`` otherwise. ``cpp`` requested explicitly raises ValueError for non-CPU or
non-fp32 tensors, and still uses ``torch`` where the kernels would give a wrong answer (a graph is being recorded)
or cannot be built (after the loader's one warning). The training path's baseline sets ``torch``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ecmnet_core.ops import axial_attention_backward_cpu, axial_attention_cpu

ENV_VAR = "ECMNET_ATTENTION_BACKEND"
BACKENDS = ("torch", "cpp")


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Softmax attention over the sequence axis: q, k (N, S, dk), v (N, S, c) -> (N, S, c)."""
    if torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
        # training: the scale inside the GEMM saves a pass over the (N, S, S) scores forward and backward
        scores = torch.baddbmm(q.new_zeros(()).expand(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2),
                               beta=0.0, alpha=scale)
    else:
        scores = torch.bmm(q, k.transpose(1, 2)) * scale
    return torch.bmm(torch.softmax(scores, dim=-1), v)


def axial_attention_torch(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """O_h + O_w in PyTorch: q, k (B, dk, H, W), v (B, C, H, W) -> (B, C, H, W). Differentiable and exportable."""
    b, c, h, w = v.shape
    # height pass: one sequence of length H per column
    qh = q.permute(0, 3, 2, 1).reshape(b * w, h, -1)
    kh = k.permute(0, 3, 2, 1).reshape(b * w, h, -1)
    vh = v.permute(0, 3, 2, 1).reshape(b * w, h, c)
    out_h = _attend(qh, kh, vh, scale).view(b, w, h, c).permute(0, 3, 2, 1)
    # width pass: one sequence of length W per row
    qw = q.permute(0, 2, 3, 1).reshape(b * h, w, -1)
    kw = k.permute(0, 2, 3, 1).reshape(b * h, w, -1)
    vw = v.permute(0, 2, 3, 1).reshape(b * h, w, c)
    out_w = _attend(qw, kw, vw, scale).view(b, h, w, c).permute(0, 3, 1, 2)
    return out_h + out_w


def _recording() -> bool:
    """True while scripting or exporting to ONNX, where the kernel cannot be part of the graph. A TorchScript trace
    or torch.compile records it as the custom op ``torch.ops.ecmnet.axial_attention_cpu``."""
    return torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _needs_autograd(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def resolve_backend(q: Tensor, k: Tensor, v: Tensor, backend: str | None = None) -> str:
    """The backend (``torch`` or ``cpp``) that :func:`axial_attention` uses for these tensors.

    Raises:
        ValueError for an unknown name, or ``cpp`` requested for non-CPU or non-fp32 tensors.
    """
    name = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"unknown axial-attention backend {name!r} (from {'argument' if backend else ENV_VAR}); "
                         f"choose one of auto, {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch"
    fits = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v))
    if name == "cpp" and not fits:
        raise ValueError("axial-attention backend 'cpp' needs float32 CPU tensors, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype} on {v.device}")
    if not fits or _recording():
        return "torch"
    if _needs_autograd(q, k, v):
        return "cpp" if axial_attention_backward_cpu.fits(q, k, v) else "torch"
    return "cpp" if axial_attention_cpu.is_available() else "torch"


def axial_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str | None = None) -> Tensor:
    """O_h + O_w: q, k (B, dk, H, W), v (B, C, H, W) -> (B, C, H, W). ``backend``: see the module docstring.

    The ``cpp`` result is in channels_last memory format; the ``torch`` result has the layout its inputs produce.
    """
    if resolve_backend(q, k, v, backend) == "cpp":
        if _needs_autograd(q, k, v):
            return axial_attention_backward_cpu.axial_attention_train(q, k, v, float(scale))
        return axial_attention_cpu.axial_attention_op(q, k, v, float(scale))
    return axial_attention_torch(q, k, v, scale)


__all__ = ["BACKENDS", "ENV_VAR", "axial_attention", "axial_attention_torch", "resolve_backend"]
