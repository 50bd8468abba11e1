"""Weighted cross-entropy with an ignore label, and a check that labels are inside the class range."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.ops import upsample_ce_cpu


class LabelRangeError(ValueError):
    """A label map holds values that are neither a class id nor the ignore index."""


class WeightedCrossEntropy(nn.Module):
    """Pixel-wise cross-entropy averaged over non-ignored pixels, with optional per-class weights.

    logits (B, K, H, W) float, target (B, H, W) int64 -> scalar. Labels outside ``[0, K)`` other than
    ``ignore_index`` raise :class:`LabelRangeError` instead of a device-side assert.
    """

    def __init__(self, num_classes: int, weight: Sequence[float] | Tensor | None = None,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32).flatten()
            if weight.numel() != self.num_classes:
                raise ValueError(f"class weights: got {weight.numel()} values for {self.num_classes} classes")
            if not torch.isfinite(weight).all() or (weight < 0).any():
                raise ValueError(f"class weights must be finite and non-negative, got {weight.tolist()}")
        self.register_buffer("weight", weight, persistent=False)

    def check_target(self, target: Tensor) -> None:
        bad = (target != self.ignore_index) & ((target < 0) | (target >= self.num_classes))
        if bool(bad.any()):
            values = torch.unique(target[bad]).tolist()[:10]
            raise LabelRangeError(f"labels {values} are outside 0..{self.num_classes - 1} and are not the "
                                  f"ignore index {self.ignore_index}")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Logits smaller than the labels (a model that leaves the last upsampling to the loss,
        ``ECMNet.upsample_in_loss``) are bilinearly upsampled to them first (align_corners=False): on fp32
        channels-last CPU logits fused with the loss (:mod:`ecmnet_core.ops.upsample_ce_cpu`)."""
        self.check_target(target)
        if logits.shape[-2:] != target.shape[-2:]:
            if upsample_ce_cpu.fits(logits, target):
                return upsample_ce_cpu.upsample_cross_entropy(logits, target, self.weight, self.ignore_index)
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        weight = self.weight.to(logits.dtype) if self.weight is not None else None
        # fp32 loss under autocast: log-softmax over K classes in fp16 loses too much. NCHW: the CPU
        # log-softmax over the channel dim of a channels-last tensor is several times slower than the copy
        weight = weight.float() if weight is not None else None
        return F.cross_entropy(logits.float().contiguous(), target, weight=weight, ignore_index=self.ignore_index)
