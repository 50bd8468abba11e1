"""Reviving what weight decay killed, without changing the function the model computes.

Adam with coupled L2 weight decay on every parameter (the paper's ``Adam(weight_decay=2e-4)``) drives any weight
whose task gradient is smaller than ``wd * w`` to zero at about ``lr`` per step, since Adam normalises the decay
term like a gradient. Once a LayerNorm's affine parameters or a residual branch's last layer are near zero, the
layers around them get no gradient either and follow. In the shipped CamVid model (``ecmnet-core release`` prints
``vanished_weights``): the FFM's whole FFN (its LayerNorm, fc1 and fc2: 82,688 weights below 1e-20) and 239 of
SS2D's 256 inner channels (their ``z`` gate rows of ``in_proj`` and ``out_proj`` columns) are dead, so the FFM
passes its input through nearly untouched; so is the second MSAU's spatial gate.

:func:`revive_vanished` re-initialises those parts so that they can learn again while the model's output stays
what it was: the FFN's LayerNorm back to (1, 0), fc1 freshly initialised and fc2's weight zero (the branch adds
fc2's bias, as before); in each dead SS2D channel the ``z`` row of ``in_proj`` freshly initialised, ``out_norm``
back to (1, 0) and the ``out_proj`` column zero (the channel adds nothing, as before); an MSAU whose spatial gate's
two convolutions vanished (the second one's did) gets a fresh depthwise kernel and a zero pointwise weight (the gate
stays the constant sigmoid of its bias). The zero last layers get
gradients at once (their inputs are no longer zero), the rest through them. Used with ``optim.decay_norms_and_biases:
false``, which keeps the decay off the one-dimensional parameters where the collapse starts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ecmnet_core.model.ffm import FFN
from ecmnet_core.model.msau import MSAU
from ecmnet_core.model.ss2d import SS2D

#: weights this far below the trained ones' scale (~1e-2) carry no signal: weight decay drove them there
VANISHED = 1e-20


def _vanished(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs() < VANISHED


def vanished_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Weights that training drove to (near) zero: the total below :data:`VANISHED` in magnitude, how many of them are
    denormal (slow on Intel cores, ``ecmnet_core.ops.fp_mode_cpu``), and per tensor with any, the count and, for a
    matrix or convolution weight, the output rows and input columns that vanished entirely (dead channels)."""
    tiny = torch.finfo(torch.float32).tiny
    total = denormal = 0
    tensors: dict[str, dict[str, int]] = {}
    for name, w in state_dict.items():
        if not w.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        w = w.detach().float()  # fp16 copies too
        small = _vanished(w)
        count = int(small.sum())
        denormal += int((small & (w != 0) & (w.abs() < tiny)).sum())
        total += count
        if not count:
            continue
        entry = {"vanished": count, "of": w.numel()}
        if w.dim() >= 2:
            flat = small.reshape(w.shape[0], w.shape[1], -1)
            entry["dead_rows"] = int(flat.all(2).all(1).sum())
            entry["dead_cols"] = int(flat.all(2).all(0).sum())
        tensors[name] = entry
    return {"threshold": VANISHED, "vanished": total, "denormal": denormal, "tensors": tensors}


def _revive_ffn(ffn: FFN, generator: torch.Generator) -> int:
    if not (bool(_vanished(ffn.fc2.weight).all()) and bool(_vanished(ffn.fc1.weight).all())):
        return 0  # alive, or revived already (fc2 zero, fc1 fresh)
    with torch.no_grad():
        ffn.norm.weight.fill_(1.0)
        ffn.norm.bias.zero_()
        bound = 1.0 / math.sqrt(ffn.fc1.in_features)  # nn.Linear's default initialisation
        ffn.fc1.weight.copy_(torch.empty_like(ffn.fc1.weight).uniform_(-bound, bound, generator=generator))
        ffn.fc1.bias.copy_(torch.empty_like(ffn.fc1.bias).uniform_(-bound, bound, generator=generator))
        ffn.fc2.weight.zero_()
    return 1


def _revive_ss2d(ss2d: SS2D, generator: torch.Generator) -> int:
    d = ss2d.d_inner
    # (d_inner,): channels out_proj no longer reads and whose z gate vanished (not a revived zero column)
    dead = _vanished(ss2d.out_proj.weight).all(0) & _vanished(ss2d.in_proj.weight[d:]).all(1)
    count = int(dead.sum())
    if not count:
        return 0
    with torch.no_grad():
        bound = 1.0 / math.sqrt(ss2d.in_proj.in_features)
        fresh = torch.empty(count, ss2d.in_proj.in_features).uniform_(-bound, bound, generator=generator)
        rows = d + torch.nonzero(dead).flatten()  # the z half of in_proj
        ss2d.in_proj.weight[rows] = fresh.to(ss2d.in_proj.weight.dtype)
        ss2d.out_norm.weight[dead] = 1.0
        ss2d.out_norm.bias[dead] = 0.0
        ss2d.out_proj.weight[:, dead] = 0.0
    return count


def _revive_msau_gate(msau: MSAU, generator: torch.Generator) -> int:
    """The spatial gate s = sigmoid(PW(DW7(p))) with both convolutions vanished is the constant sigmoid(PW's bias):
    DW7 freshly initialised and PW's weight zero keep that constant and let PW learn."""
    if not (bool(_vanished(msau.spatial_pw.weight).all()) and bool(_vanished(msau.spatial_dw.weight).all())):
        return 0
    with torch.no_grad():
        dw = msau.spatial_dw
        bound = 1.0 / math.sqrt(dw.weight[0].numel())  # nn.Conv2d's default initialisation bound
        dw.weight.copy_(torch.empty_like(dw.weight).uniform_(-bound, bound, generator=generator))
        msau.spatial_pw.weight.zero_()
    return 1


def revive_vanished(model: nn.Module, seed: int = 0) -> dict[str, int]:
    """Revive every dead FFN, dead SS2D channel and dead MSAU spatial gate of ``model`` in place (see the module
    docstring); returns ``{"ffn": blocks, "ss2d_channels": channels, "msau_gates": gates}`` revived. The output is
    unchanged up to the vanished weights' size (below 1e-20)."""
    generator = torch.Generator().manual_seed(seed)
    out = {"ffn": 0, "ss2d_channels": 0, "msau_gates": 0}
    for module in model.modules():
        if isinstance(module, FFN):
            out["ffn"] += _revive_ffn(module, generator)
        elif isinstance(module, MSAU):
            out["msau_gates"] += _revive_msau_gate(module, generator)
        elif isinstance(module, SS2D):
            out["ss2d_channels"] += _revive_ss2d(module, generator)
    return out


__all__ = ["VANISHED", "revive_vanished", "vanished_weights"]
