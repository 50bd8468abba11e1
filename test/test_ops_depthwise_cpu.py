"""The compiled depthwise-convolution backward of the training path (:mod:`ecmnet_core.ops.depthwise_cpu`) gives
PyTorch's gradients (float64 reference) for the model's geometries and the awkward edges, and is used only where it
applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ecmnet_core.model.layers import DepthwiseConv2d
from ecmnet_core.ops import depthwise_cpu

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not depthwise_cpu.is_available(), reason="no C++ compiler for the CPU kernel")]


def _conv(channels: int, kernel: tuple[int, int], dilation: tuple[int, int], bias: bool) -> DepthwiseConv2d:
    padding = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
    conv = DepthwiseConv2d(channels, kernel, padding, dilation, bias=bias)
    conv.fast = True
    return conv


@pytest.mark.parametrize("shape,kernel,dilation,bias", [
    ((2, 16, 9, 12), (3, 1), (2, 1), False),   # EDAB's dilated pair
    ((2, 16, 9, 12), (1, 3), (1, 4), False),
    ((2, 13, 8, 7), (1, 3), (1, 2), True),     # channels not a multiple of the vector width
    ((1, 8, 6, 5), (3, 1), (16, 1), False),    # dilation beyond the map: only the centre tap sees data
    ((2, 24, 10, 11), (5, 5), (1, 1), True),   # MSAU
    ((2, 16, 1, 20), (7, 7), (1, 1), True),    # MSAU's spatial conv on a (B, h, 1, W) profile
    ((2, 21, 40, 50), (7, 7), (1, 1), True),   # enough work for a two-thread team (run with 2 threads)
])
def test_backward_matches_float64_pytorch(shape, kernel, dilation, bias):
    if shape[2] * shape[3] >= 2000:
        torch.set_num_threads(2)  # the fixture restores its thread count afterwards
    torch.manual_seed(0)
    conv = _conv(shape[1], kernel, dilation, bias)
    ref = nn.Conv2d(shape[1], shape[1], kernel, 1, conv.padding, dilation, shape[1], bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(*shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    grad = torch.randn(*shape)
    assert depthwise_cpu.fits(x, conv)
    out = conv(x)
    out.backward(grad)
    want = ref(x64)
    want.backward(grad.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    pairs = {"out": (out, want), "dx": (x.grad, x64.grad), "dweight": (conv.weight.grad, ref.weight.grad)}
    if bias:
        pairs["dbias"] = (conv.bias.grad, ref.bias.grad)
    for key, (got, value) in pairs.items():
        err = float((got.double() - value).abs().max() / value.abs().max().clamp_min(1e-12))
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


def test_kernel_is_used_only_where_it_applies():
    x = torch.randn(2, 8, 10, 12)
    cl = x.contiguous(memory_format=torch.channels_last)
    dilated = _conv(8, (1, 3), (1, 2), False)
    assert depthwise_cpu.fits(cl, dilated)
    assert not depthwise_cpu.fits(x, dilated)  # NCHW
    assert not depthwise_cpu.fits(cl.double(), _conv(8, (1, 3), (1, 2), False).double())
    assert not depthwise_cpu.fits(cl, _conv(8, (3, 1), (1, 1), False))  # undilated 3-tap: oneDNN is as fast
    assert not depthwise_cpu.fits(cl, _conv(8, (3, 3), (1, 1), True))
    grouped = nn.Conv2d(8, 8, (1, 3), padding=(0, 2), dilation=(1, 2), groups=4)
    assert not depthwise_cpu.fits(cl, grouped)
    strided = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)
    assert not depthwise_cpu.fits(cl, strided)
    shrinking = nn.Conv2d(8, 8, (1, 3), padding=(0, 1), dilation=(1, 2), groups=8)  # output narrower than input
    assert not depthwise_cpu.fits(cl, shrinking)
    # no gradients (inference) or fast off: PyTorch's convolution, same numbers
    with torch.no_grad():
        plain = nn.functional.conv2d(cl, dilated.weight, None, 1, dilated.padding, dilated.dilation, 8)
        assert torch.equal(dilated(cl), plain)
    dilated.fast = False
    assert dilated(cl).grad_fn.name() == "ConvolutionBackward0"
    dilated.fast = True
    assert dilated(cl).grad_fn.name() != "ConvolutionBackward0"


def test_state_dict_keys_are_those_of_nn_conv2d():
    conv = DepthwiseConv2d(6, (3, 1), (2, 0), (2, 1), bias=False)
    ref = nn.Conv2d(6, 6, (3, 1), 1, (2, 0), (2, 1), 6, bias=False)
    assert conv.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(conv.state_dict())
