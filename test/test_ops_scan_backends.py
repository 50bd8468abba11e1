"""Selective scan: every CPU backend (and the package's fp32 reference loop) against an independent float64
sequential loop (values and all eight gradients), SS2D's cross-scan/cross-merge identity (spec section 9), and
causality along each of the four scan orders."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from ecmnet_core.model import SS2D
from ecmnet_core.ops.selective_scan import available_backends, selective_scan_fn, selective_scan_ref

# one intra-op thread (conftest): on the shared 2-core machine OpenMP spinning makes 2 threads much slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL, ATOL_REL = 1e-4, 1e-5  # against float64: atol = ATOL_REL * max|reference|
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
#: CPU backends under test: everything that runs here except the reference itself (torch, cpp when it builds).
BACKENDS = [b for b in available_backends("cpu") if b != "reference"]


@dataclass(frozen=True)
class Case:
    id: str
    length: int
    batch: int = 2
    dim: int = 8
    n: int = 4
    groups: int = 2  # 0: B/C given as (batch, N, L)
    use_d: bool = True
    use_z: bool = True
    use_bias: bool = True
    softplus: bool = True
    delta_scale: float = 0.5  # delta ~ scale * N(0, 1), or |.| up to ~5 for the large-delta case
    large_delta: bool = False


CASES = [
    *(Case(f"L{length}", length) for length in (1, 7, 64, 257, 1000)),
    Case("groups1-3d", 64, groups=0),
    Case("groups4", 64, dim=16, groups=4),
    Case("groups-per-channel", 33, dim=4, groups=4),
    Case("no-D-z-bias", 64, use_d=False, use_z=False, use_bias=False),
    Case("no-softplus", 65, softplus=False, use_bias=False),
    Case("large-delta", 257, large_delta=True, softplus=False, use_bias=False),
    Case("batch1-dim1", 130, batch=1, dim=1, groups=1),
]


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    b, d, n, length = case.batch, case.dim, case.n, case.length
    if case.large_delta:  # positive steps up to ~5: exp(delta * A) underflows towards 0 for the larger |A|
        delta = 5 * torch.rand(b, d, length, generator=g)
    else:
        delta = case.delta_scale * torch.randn(b, d, length, generator=g)
        if not case.softplus:
            delta = delta.abs()
    bc_shape = (b, n, length) if case.groups == 0 else (b, case.groups, n, length)
    return {
        "u": torch.randn(b, d, length, generator=g),
        "delta": delta,
        "A": -torch.rand(d, n, generator=g) * 2 - 0.1,
        "B": torch.randn(*bc_shape, generator=g),
        "C": torch.randn(*bc_shape, generator=g),
        "D": torch.randn(d, generator=g) if case.use_d else None,
        "z": torch.randn(b, d, length, generator=g) if case.use_z else None,
        "delta_bias": 0.3 * torch.randn(d, generator=g) if case.use_bias else None,
    }


def scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """The recurrence written out independently of the package, for float64 ground truth.

    Steps are taken with ``unbind`` so that autograd's backward stays O(L) (indexing one step at a time would
    allocate a full-size gradient per step).
    """
    batch, dim, _ = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = dim // B.shape[1]
    Bc, Cc = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)  # (batch, dim, N, L)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for dt, ut, bt, ct in zip(delta.unbind(-1), u.unbind(-1), Bc.unbind(-1), Cc.unbind(-1)):
        h = torch.exp(dt[..., None] * A) * h + (dt * ut)[..., None] * bt
        ys.append((h * ct).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def run_scan(inputs: dict, softplus: bool, backend: str | None, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Output and gradients (for a fixed random upstream gradient) of every given input.

    ``backend`` None: :func:`scan64`; "package-reference": the package's ``selective_scan_ref``.
    """
    leaves = {k: (v.to(dtype).clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    args = [leaves[k] for k in GRAD_NAMES]
    if backend is None:
        y = scan64(*args, delta_softplus=softplus)
    elif backend == "package-reference":
        y = selective_scan_ref(*args, delta_softplus=softplus)
    else:
        y = selective_scan_fn(*args, delta_softplus=softplus, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(gy)
    return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    expected = expected.to(torch.float64)
    atol = ATOL_REL * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@functools.cache
def float64_truth(case: Case) -> tuple[torch.Tensor, dict]:
    return run_scan(make_inputs(case), case.softplus, None, torch.float64)


# the package's own reference loop in fp32 too, but not at L = 1000: its per-step indexing makes autograd O(L^2)
AGREEMENT = [pytest.param(b, c, id=f"{c.id}-{b}") for c in CASES for b in [*BACKENDS, "package-reference"]
             if not (b == "package-reference" and c.length > 300)]


@pytest.mark.parametrize("backend, case", AGREEMENT)
def test_backend_matches_float64_reference(backend: str, case: Case) -> None:
    inputs = make_inputs(case)
    y_ref, g_ref = float64_truth(case)
    y, grads = run_scan(inputs, case.softplus, backend, torch.float32)
    assert y.dtype == torch.float32 and y.shape == (case.batch, case.dim, case.length)
    assert_close(y, y_ref, f"{backend} output")
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name] is not None, f"{backend}: no gradient for {name}"
        assert_close(grads[name], g_ref[name], f"{backend} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_state_matches_reference(backend: str) -> None:
    inputs = make_inputs(Case("state", 100))
    args = [inputs[k] for k in GRAD_NAMES]
    y_ref, h_ref = selective_scan_ref(*[a.double() if a is not None else None for a in args], delta_softplus=True,
                                      return_last_state=True)
    assert_close(y_ref, scan64(*[a.double() if a is not None else None for a in args], delta_softplus=True), "ref")
    y, h = selective_scan_fn(*args, delta_softplus=True, return_last_state=True, backend=backend)
    assert_close(y, y_ref, "output")
    assert_close(h, h_ref, "last state")


def test_reference_is_the_recurrence() -> None:
    """One hand-computed step: h1 = exp(d*A) * 0 + d*B*u; y = C*h1 + D*u (batch 1, dim 1, N 1, L 1)."""
    u, d, a, b, c, dd = 2.0, 0.5, -1.0, 3.0, 4.0, 0.25
    y = selective_scan_ref(torch.tensor([[[u]]]), torch.tensor([[[d]]]), torch.tensor([[a]]),
                           torch.tensor([[[b]]]), torch.tensor([[[c]]]), torch.tensor([dd]))
    assert y.item() == pytest.approx(c * (d * b * u) + dd * u)
    # and a second step decays the first state by exp(d*A)
    y2 = selective_scan_ref(torch.tensor([[[u, 0.0]]]), torch.tensor([[[d, d]]]), torch.tensor([[a]]),
                            torch.tensor([[[b, b]]]), torch.tensor([[[c, c]]]))
    assert y2[0, 0, 1].item() == pytest.approx(c * math.exp(d * a) * d * b * u)


# ---------------------------------------------------------------------------------------------------------------
# SS2D: cross-scan / cross-merge and causality


def test_cross_scan_orders() -> None:
    """seq0 row-major, seq1 column-major, seq2/seq3 their reverses; merge maps every order back to row-major."""
    h, w = 3, 5
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    seqs = SS2D.cross_scan(x)[0, :, 0]  # (4, L)
    rows = torch.arange(h * w, dtype=torch.float32)
    cols = x[0, 0].t().reshape(-1)
    assert torch.equal(seqs[0], rows)
    assert torch.equal(seqs[1], cols)
    assert torch.equal(seqs[2], rows.flip(0))
    assert torch.equal(seqs[3], cols.flip(0))
    merged = SS2D.cross_merge(SS2D.cross_scan(x), h, w)
    assert torch.equal(merged, 4 * x.view(1, 1, h * w))


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_ss2d_identity_with_zero_x_proj(backend: str) -> None:
    """x_proj = 0 gives B = C = 0, so every direction returns D*u = u (D = 1): SS2D(x) equals
    out_proj(LN(4 * x_conv) * SiLU(z)) with x_conv = SiLU(DWConv(x-part of in_proj))."""
    torch.manual_seed(0)
    ss2d = SS2D(16, d_state=4, scan_backend=backend).eval()
    with torch.no_grad():
        ss2d.x_proj_weight.zero_()
    x = torch.randn(2, 5, 7, 16)
    with torch.no_grad():
        out = ss2d(x)
        xs, z = ss2d.in_proj(x).chunk(2, dim=-1)
        x_conv = F.silu(ss2d.conv2d(xs.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        expected = ss2d.out_proj(ss2d.out_norm(4 * x_conv) * F.silu(z))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _order_positions(h: int, w: int, i: int, j: int) -> list[int]:
    """Index of pixel (i, j) in each of the four scan orders."""
    length = h * w
    return [i * w + j, j * h + i, length - 1 - (i * w + j), length - 1 - (j * h + i)]


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_ss2d_causality_along_each_order(backend: str) -> None:
    """With the depthwise conv made pointwise, perturbing pixel (i, j) changes each direction's scan output only
    at (i, j)'s position in that direction's order and later, and does change it there."""
    torch.manual_seed(0)
    h, w = 4, 6
    ss2d = SS2D(8, d_state=4, scan_backend=backend).eval()
    with torch.no_grad():  # identity depthwise kernel: no spatial mixing before the scan
        ss2d.conv2d.weight.zero_()
        ss2d.conv2d.weight[:, :, 1, 1] = 1.0
        ss2d.conv2d.bias.zero_()
    captured: list[torch.Tensor] = []
    ss2d.scan.register_forward_hook(lambda m, inp, out: captured.append(out.detach().clone()))
    x = torch.randn(1, h, w, 8)
    i, j = 2, 3
    x2 = x.clone()
    x2[0, i, j] += 1.0
    with torch.no_grad():
        ss2d(x)
        ss2d(x2)
    k, d = ss2d.directions, ss2d.d_inner
    y1, y2 = (c.view(1, k, d, h * w) for c in captured)
    changed = (y1 - y2).abs().amax(dim=(0, 2)) > 1e-6  # (4, L)
    for direction, pos in enumerate(_order_positions(h, w, i, j)):
        assert not changed[direction, :pos].any(), f"direction {direction}: change before position {pos}"
        assert changed[direction, pos], f"direction {direction}: no change at position {pos}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_causality_per_input(backend: str) -> None:
    """Perturbing step t of u, delta, B, C or z leaves the outputs before t bit-for-bit unchanged."""
    inputs = make_inputs(Case("causal", 50))
    t = 23
    with torch.no_grad():
        base = selective_scan_fn(*[inputs[k] for k in GRAD_NAMES], delta_softplus=True, backend=backend)
        for name in ("u", "delta", "B", "C", "z"):
            changed = dict(inputs)
            changed[name] = inputs[name].clone()
            changed[name][..., t] += 1.0
            out = selective_scan_fn(*[changed[k] for k in GRAD_NAMES], delta_softplus=True, backend=backend)
            assert torch.equal(out[..., :t], base[..., :t]), f"{name}: output before step {t} changed"
            assert not torch.equal(out[..., t], base[..., t]), f"{name}: output at step {t} did not change"
