"""Inference-time rewrites that keep the function but drop work (:func:`optimize_for_inference`): batch norms folded
into the preceding convolutions, and the 1x1 classifier moved before the final bilinear upsampling.

In eval mode a BatchNorm is a per-channel affine map y = s * x + t (s = gamma / sqrt(var + eps),
t = beta - s * mean). When it directly follows a convolution, the affine map moves into the convolution's weights
and bias, and the BatchNorm becomes an ``nn.Identity``. The patterns in ECMNet:

* :class:`~ecmnet_core.model.layers.ConvBNPReLU` -- conv, then ``BNPReLU`` whose first layer is the BatchNorm;
* :class:`~ecmnet_core.model.layers.UpsamplingBlock` -- transposed conv, BatchNorm, ReLU6;
* :class:`~ecmnet_core.model.layers.DownSamplingBlock` without widening -- conv, then ``BNPReLU``.

BatchNorms that follow an addition, a concatenation with a max-pool or a block boundary stay as they are. The
result agrees with the unfolded model to float rounding (about 1e-6 relative); training a folded model is wrong,
so :func:`fold_batchnorm` works on a copy in eval mode unless ``inplace``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ecmnet_core.model.layers import BNPReLU, ConvBNPReLU, DownSamplingBlock, UpsamplingBlock


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv`` so that conv'(x) == bn(conv(x)) in eval mode (PyTorch's own folding arithmetic)."""
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias, transpose=isinstance(conv, nn.ConvTranspose2d))


def _foldable(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None and bn.affine


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it; returns the (copied) model in eval mode.

    Counts of folded layers are stored as ``model.folded_batchnorms`` for logs and tests.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    folded = 0
    for module in model.modules():
        conv: nn.Module | None = None
        holder: nn.Module | None = None
        index = 0
        if isinstance(module, ConvBNPReLU) and len(module) == 2 and isinstance(module[1], BNPReLU):
            conv, holder, index = module[0], module[1], 0
        elif isinstance(module, UpsamplingBlock):
            conv, holder, index = module[0], module, 1
        elif isinstance(module, DownSamplingBlock) and module.pool is None:
            conv, holder, index = module.conv, module.bn_prelu, 0
        if conv is None or holder is None or not _foldable(holder[index]):
            continue
        _fold_into_conv(conv, holder[index])
        holder[index] = nn.Identity()
        folded += 1
    model.folded_batchnorms = folded
    return model


def optimize_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every inference rewrite: :func:`fold_batchnorm`, and the classifier applied before the final upsampling
    (``ECMNet.classify_before_upsample``: linear maps commute). Same function up to float rounding; eval mode."""
    model = fold_batchnorm(model, inplace=inplace)
    if hasattr(model, "classify_before_upsample"):
        model.classify_before_upsample = True
    return model


__all__ = ["fold_batchnorm", "optimize_for_inference"]
