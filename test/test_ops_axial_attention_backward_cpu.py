"""DDA's training attention (:mod:`ecmnet_core.ops.axial_attention_backward_cpu`: compiled forward with
log-sum-exp, compiled backward) gives PyTorch's output and q, k, v gradients (float64 reference), and DDA trains
through it."""

from __future__ import annotations

import pytest
import torch

from ecmnet_core.model import DDA
from ecmnet_core.ops import axial_attention_backward_cpu
from ecmnet_core.ops.axial_attention import axial_attention_torch

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not axial_attention_backward_cpu.is_available(),
                                 reason="no C++ compiler for the CPU kernel")]


def _inputs(b: int, d: int, c: int, h: int, w: int, channels_last: bool = True):
    torch.manual_seed(b * 1000 + d * 100 + c + h + w)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    q, k, v = (torch.randn(b, n, h, w, dtype=torch.float64).contiguous(memory_format=fmt) for n in (d, d, c))
    return q, k, v, torch.randn(b, c, h, w, dtype=torch.float64)


@pytest.mark.parametrize("b,d,c,h,w", [
    (2, 4, 32, 9, 13),   # DDA at 32 channels; sequence lengths off the query block (4) and the key vector
    (1, 3, 13, 17, 5),   # channel counts off the vector width
    (2, 8, 64, 11, 19),
    (1, 1, 8, 1, 7),     # a single row: the height pass attends to itself only
    (2, 2, 16, 30, 40),  # enough work for two threads (run with 2)
])
def test_output_and_gradients_match_float64_pytorch(b, d, c, h, w):
    if h * w >= 1000:
        torch.set_num_threads(2)  # the fixture restores its thread count afterwards
    q, k, v, grad = _inputs(b, d, c, h, w)
    scale = d ** -0.5
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = axial_attention_torch(*ref_in, scale)
    ref.backward(grad)
    got_in = [t.float().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (q, k, v)]
    assert axial_attention_backward_cpu.fits(*got_in)
    out = axial_attention_backward_cpu.axial_attention_train(*got_in, scale)
    out.backward(grad.float())
    assert out.is_contiguous(memory_format=torch.channels_last)
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in got_in],
                               [ref] + [t.grad for t in ref_in]):
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_nchw_inputs_and_peaked_softmax():
    """NCHW inputs (copied to channels-last) and large scores: a near one-hot softmax must not overflow."""
    q, k, v, grad = _inputs(1, 4, 16, 6, 7, channels_last=False)
    q, k = q * 8, k * 8
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    axial_attention_torch(*ref_in, 0.5).backward(grad)
    got_in = [t.float().requires_grad_() for t in (q, k, v)]
    axial_attention_backward_cpu.axial_attention_train(*got_in, 0.5).backward(grad.float())
    for got, want in zip(got_in, ref_in):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4 * float(want.grad.abs().max()))


def test_dda_backward_goes_through_the_kernel_and_matches_torch():
    torch.manual_seed(0)
    dda = DDA(16)
    with torch.no_grad():
        dda.gamma.fill_(0.5)
    x = torch.randn(2, 16, 9, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    dda.to(memory_format=torch.channels_last)
    out = dda(x)
    names = set()
    stack = [out.grad_fn]
    while stack:  # the autograd graph holds the kernel's node, not PyTorch's softmax
        node = stack.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            stack.extend(n for n, _ in node.next_functions)
    assert any("AxialAttentionFunction" in n for n in names) and "SoftmaxBackward0" not in names
    grads = torch.autograd.grad(out.square().sum(), [x, *dda.parameters()])
    dda.backend = "torch"
    want = torch.autograd.grad(dda(x).square().sum(), [x, *dda.parameters()])
    scale = max(float(w.abs().max()) for w in want)  # the key bias's gradient is 0 up to rounding
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)
