"""The fused upsampling cross-entropy of the training path (:mod:`ecmnet_core.ops.upsample_ce_cpu`) is PyTorch's
bilinear interpolate + weighted cross-entropy (float64 reference), and the loss and model hand the upsampling over
only where they should."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ecmnet_core.model import build_model, model_config
from ecmnet_core.ops import upsample_ce_cpu
from ecmnet_core.train.losses import WeightedCrossEntropy

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not upsample_ce_cpu.is_available(), reason="no C++ compiler for the CPU kernel")]


def _reference(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None):
    x = logits.detach().double().requires_grad_()
    up = F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, target, weight=weight.double() if weight is not None else None, ignore_index=255)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("b,k,h,w,oh,ow,weighted", [
    (2, 11, 9, 12, 18, 24, True),   # CamVid classes, exact 2x
    (3, 5, 7, 5, 13, 11, False),    # odd sizes, not a multiple: PyTorch's source-index rule
    (2, 19, 4, 6, 4, 6, True),      # Cityscapes classes, same size (identity interpolation)
    (1, 3, 1, 1, 5, 7, True),       # one source pixel
    (4, 11, 20, 30, 40, 60, True),  # enough images for a two-thread team (run with 2)
])
def test_matches_float64_interpolate_and_cross_entropy(b, k, h, w, oh, ow, weighted):
    if b >= 4:
        torch.set_num_threads(2)  # the fixture restores its thread count afterwards
    torch.manual_seed(b + k + h)
    logits = (torch.randn(b, k, h, w) * 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    target = torch.randint(0, k, (b, oh, ow))
    target[0, 0, : min(3, ow)] = 255
    weight = torch.rand(k) + 0.5 if weighted else None
    assert upsample_ce_cpu.fits(logits, target)
    loss = upsample_ce_cpu.upsample_cross_entropy(logits, target, weight, 255)
    loss.backward()
    want, grad = _reference(logits, target, weight)
    assert abs(float(loss) - float(want)) < 1e-5 * abs(float(want))
    assert logits.grad.is_contiguous(memory_format=torch.channels_last)
    assert float((logits.grad.double() - grad).abs().max() / grad.abs().max()) < 1e-5


def test_all_pixels_ignored_gives_nan_like_pytorch():
    logits = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    target = torch.full((1, 6, 6), 255)
    assert math.isnan(float(upsample_ce_cpu.upsample_cross_entropy(logits, target, None, 255)))
    assert math.isnan(float(_reference(logits, target, None)[0]))


def test_loss_upsamples_smaller_logits_by_either_route():
    """WeightedCrossEntropy: channels-last fp32 logits take the kernel, NCHW ones interpolate first; same loss."""
    torch.manual_seed(0)
    crit = WeightedCrossEntropy(6, torch.rand(6) + 0.5, 255)
    logits = torch.randn(2, 6, 5, 7)
    target = torch.randint(0, 6, (2, 10, 14))
    fused = crit(logits.contiguous(memory_format=torch.channels_last), target)
    plain = crit(logits, target)  # NCHW: not what the kernel reads
    want = F.cross_entropy(F.interpolate(logits, size=(10, 14), mode="bilinear", align_corners=False), target,
                           weight=crit.weight, ignore_index=255)
    assert float(fused) == pytest.approx(float(want), rel=1e-5)
    assert float(plain) == pytest.approx(float(want), rel=1e-6)


def test_model_leaves_upsampling_to_the_loss_only_when_training():
    model = build_model(model_config("ecmnet", 5))
    model.classify_before_upsample = True
    model.upsample_in_loss = True
    x = torch.randn(1, 3, 64, 96)
    model.train()
    assert tuple(model(x).shape) == (1, 5, 32, 48)
    model.eval()
    with torch.no_grad():
        assert tuple(model(x).shape) == (1, 5, 64, 96)
