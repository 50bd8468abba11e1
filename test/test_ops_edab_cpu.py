"""Compiled CPU inference kernels of EDAB and BNPReLU (``ecmnet_core.ops.edab_cpu``): each kernel against float64
PyTorch (channel counts on and off the vector width, 1-pixel and odd maps, dilations larger than the map, batch 2,
thread counts); the optimized model with the kernels equal to the same model without them (logits and arg-max
labels), traced as custom ops, unused whenever autograd records a graph, and checkpoints unchanged by the packed
buffers. Skips when no compiler can build the library."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ecmnet_core.model import build_model
from ecmnet_core.model.edab import EDAB
from ecmnet_core.model.fuse import optimize_for_inference
from ecmnet_core.model.layers import BNPReLU, channel_shuffle
from ecmnet_core.ops import edab_cpu

RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def library() -> None:
    if edab_cpu.load_library() is None:
        pytest.skip(f"compiled CPU EDAB kernels unavailable: {edab_cpu.KERNEL.error}")


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def close(out: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    err = (out.double() - ref.double()).abs()
    assert (err <= rtol * (ref.abs().max() + ref.abs())).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("c", [8, 12, 16, 32, 64])
@pytest.mark.parametrize("hw,d", [((23, 30), 1), ((23, 30), 2), ((5, 3), 5), ((1, 1), 1), ((2, 9), 3), ((9, 1), 2)])
def test_depthwise_pair_matches_float64(c: int, hw: tuple[int, int], d: int) -> None:
    g = torch.Generator().manual_seed(c + d)
    x = cl(torch.randn(2, c, *hw, generator=g))
    w1, w2 = torch.randn(c, 1, 3, 1, generator=g), torch.randn(c, 1, 1, 3, generator=g)
    b1, b2 = torch.randn(c, generator=g), torch.randn(c, generator=g)
    a1, a2 = torch.rand(c, generator=g), torch.rand(1, generator=g)  # per-channel and shared slopes
    t = F.prelu(F.conv2d(x.double(), w1.double(), b1.double(), padding=(d, 0), dilation=(d, 1), groups=c), a1.double())
    ref = F.prelu(F.conv2d(t, w2.double(), b2.double(), padding=(0, d), dilation=(1, d), groups=c), a2.double())
    out, mean = edab_cpu.dw_pair_cpu(x, edab_cpu.pack_params(w1, b1, a1, w2, b2, a2), d, d, want_mean=True)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    close(out, ref)
    close(mean, ref.mean(dim=(2, 3)))


def test_merge_shuffle_and_affine_prelu_match_pytorch() -> None:
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 24, 7, 11
    f, t1, t2, att = (cl(torch.randn(b, c, h, w, generator=g)) for _ in range(4))
    e, gamma = torch.rand(b, c, generator=g), torch.tensor([0.7])
    bn = nn.BatchNorm2d(c, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.normal_(generator=g)
        bn.bias.normal_(generator=g)
    a = torch.rand(c, generator=g)
    params = edab_cpu.pack_merge_params(bn, a)
    with torch.no_grad():
        ref = F.prelu(bn(f + e[:, :, None, None] * t1 + t2 + gamma * att), a)
        close(edab_cpu.edab_merge_cpu(f, t1, e, t2, att, gamma, params), ref)
        close(edab_cpu.affine_prelu_cpu(f, params), F.prelu(bn(f), a))
    for groups in (c // 2, 4, 1, c):
        close(edab_cpu.add_shuffle_cpu(f, t1, groups), channel_shuffle(f + t1, groups))


def test_results_do_not_depend_on_the_thread_count(threads) -> None:
    x = cl(torch.randn(1, 32, 45, 60))
    p = edab_cpu.pack_params(torch.randn(32, 1, 3, 1), torch.randn(32), torch.rand(32), torch.randn(32, 1, 1, 3),
                             torch.randn(32), torch.rand(32))
    outs = []
    for n in (1, 2, 3):
        threads(n)
        outs.append(edab_cpu.dw_pair_cpu(x, p, 2, 2, want_mean=True))
    for out, mean in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(mean, outs[0][1])


def test_invalid_inputs_are_clear_errors() -> None:
    x = cl(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\(10, 8\)"):
        edab_cpu.dw_pair_cpu(x, torch.zeros(10, 4), 1, 1)
    with pytest.raises(ValueError, match="float32"):
        edab_cpu.dw_pair_cpu(x.double(), torch.zeros(10, 8), 1, 1)
    with pytest.raises(ValueError, match="expected 24"):
        edab_cpu.pack_params(torch.zeros(8, 1, 2), torch.zeros(8), torch.zeros(8), torch.zeros(8, 1, 1, 3),
                             torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="shape"):
        edab_cpu.add_shuffle_cpu(x, cl(torch.randn(1, 8, 4, 5)), 4)


# ------------------------------------------------------------------------------------------------ in the model
def calibrated_model() -> nn.Module:
    """An ECMNet with non-trivial batch-norm statistics and DDA gammas (a fresh one has gamma = 0)."""
    torch.manual_seed(0)
    model = build_model("ecmnet", 11, scan_backend="reference")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if hasattr(m, "gamma") and isinstance(m.gamma, nn.Parameter):
                m.gamma.fill_(0.5)
    return model.eval()


def without_kernels(model: nn.Module) -> nn.Module:
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, EDAB):
            m.pair_b1 = m.pair_b2 = m.merge = None
        if isinstance(m, BNPReLU):
            m.affine = None
    return plain


def test_optimized_model_with_kernels_equals_it_without() -> None:
    """The shipped model (trained activations: a random deep model's grow without bound and amplify rounding)."""
    from ecmnet_core.checkpoint import load_checkpoint

    model = optimize_for_inference(load_checkpoint().build_model()).to(memory_format=torch.channels_last)
    assert all(m.pair_b1 is not None and m.merge is not None for m in model.modules() if isinstance(m, EDAB))
    plain = without_kernels(model)
    x = cl(torch.randn(1, 3, 120, 160, generator=torch.Generator().manual_seed(3)))
    with torch.inference_mode():
        ref, out = plain(x), model(x)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        graph = str(traced.inlined_graph)
        assert all(f"ecmnet::{op}" in graph for op in ("dw_pair_cpu", "edab_merge_cpu", "add_shuffle_cpu",
                                                        "affine_prelu_cpu"))
        close(traced(x), ref, 1e-4)
    close(out, ref, 1e-4)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def test_kernels_are_not_used_under_autograd_and_checkpoints_are_unchanged() -> None:
    base = calibrated_model()
    model = optimize_for_inference(base).to(memory_format=torch.channels_last)
    x = cl(torch.randn(1, 3, 64, 96)).requires_grad_()
    out = model(x)  # grad mode: the PyTorch layers, so the input gets a gradient
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the packed blocks are non-persistent: an optimized model saves what a folded one does
    assert not any(k.endswith(("pair_b1", "pair_b2", "merge", "affine")) for k in model.state_dict())
