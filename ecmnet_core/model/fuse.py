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

from ecmnet_core.model.attention import DDA
from ecmnet_core.model.edab import EDAB
from ecmnet_core.model.layers import BNPReLU, ConvBNPReLU, DownSamplingBlock, UpsamplingBlock
from ecmnet_core.ops.edab_cpu import pack_merge_params, pack_params


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


def _folded_conv_prelu(block: ConvBNPReLU) -> tuple[nn.Conv2d, nn.Module] | None:
    """(conv with the batch norm folded in, PReLU) of a folded ConvBNPReLU, else None."""
    if len(block) == 2 and isinstance(block[1], BNPReLU) and isinstance(block[1][0], nn.Identity) \
            and block[0].bias is not None:
        return block[0], block[1][1]
    return None


def pack_depthwise_pairs(model: nn.Module) -> int:
    """Store each EDAB's two folded depthwise pairs and its eval-mode ``bn_prelu_out`` as the compiled kernels'
    parameter blocks (``EDAB.pair_b1``/``pair_b2``/``merge``, non-persistent buffers); returns how many EDABs got
    them."""
    packed = 0
    for module in model.modules():
        if not isinstance(module, EDAB):
            continue
        pairs = []
        for first, second in ((module.dconv3x1, module.dconv1x3), (module.ddconv3x1, module.ddconv1x3)):
            a, b = _folded_conv_prelu(first), _folded_conv_prelu(second)
            if a is None or b is None:
                break
            pairs.append(pack_params(a[0].weight, a[0].bias, a[1].weight, b[0].weight, b[0].bias, b[1].weight))
        out = module.bn_prelu_out
        if len(pairs) == 2 and _foldable(out[0]) and isinstance(out[1], nn.PReLU):
            module.pair_b1, module.pair_b2 = pairs
            module.merge = pack_merge_params(out[0], out[1].weight)
            packed += 1
    return packed


def pack_bn_prelu(model: nn.Module) -> int:
    """Store every eval-mode BNPReLU whose batch norm could not be folded as the compiled kernel's (3, C) block
    (``BNPReLU.affine``; a folded one is a PReLU alone, which PyTorch's own kernel runs as fast); returns the count."""
    packed = 0
    for module in model.modules():
        if isinstance(module, BNPReLU) and _foldable(module[0]) and isinstance(module[1], nn.PReLU):
            module.affine = pack_merge_params(module[0], module[1].weight)
            packed += 1
    return packed


def stack_dda_projections(model: nn.Module) -> int:
    """Stack each DDA's query, key and value 1x1 convolutions into one (``DDA.qkv_weight``/``qkv_bias``,
    non-persistent buffers); returns the count."""
    stacked = 0
    for module in model.modules():
        if isinstance(module, DDA) and all(m.bias is not None for m in (module.query, module.key, module.value)):
            convs = (module.query, module.key, module.value)
            module.qkv_weight = torch.cat([m.weight.detach() for m in convs])
            module.qkv_bias = torch.cat([m.bias.detach() for m in convs])
            stacked += 1
    return stacked


def optimize_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every inference rewrite: :func:`fold_batchnorm`, the classifier applied before the final upsampling
    (``ECMNet.classify_before_upsample``: linear maps commute), the parameter blocks of the compiled EDAB kernels
    (:func:`pack_depthwise_pairs`, :func:`pack_bn_prelu`) and DDA's projections as one convolution
    (:func:`stack_dda_projections`). Same function up to float rounding; eval mode."""
    model = fold_batchnorm(model, inplace=inplace)
    pack_depthwise_pairs(model)
    pack_bn_prelu(model)
    stack_dda_projections(model)
    if hasattr(model, "classify_before_upsample"):
        model.classify_before_upsample = True
    return model


__all__ = ["fold_batchnorm", "optimize_for_inference", "pack_bn_prelu", "pack_depthwise_pairs", "stack_dda_projections"]
