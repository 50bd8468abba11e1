"""Compiled CPU selective scan (``cpp`` backend): agreement with a float64 reference on the kernel's own code paths
(N = 16 specialisation and generic N, partial channel tiles, several backward parts, chunk boundaries, thread
counts), the portable build and its on-disk cache, the fallback to ``torch`` without a compiler, dispatch through
``selective_scan_fn`` and input errors. Kernel tests skip when no compiler can build the library."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ecmnet_core.ops import cbuild, selective_scan_cpu
from ecmnet_core.ops.selective_scan import available_backends, resolve_backend, selective_scan_fn, selective_scan_ref

RTOL, ATOL_REL = 1e-4, 1e-5  # against float64: atol = ATOL_REL * max|reference|
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(scope="module")
def lanes() -> int:
    """Channels per SIMD tile of the built library; skips the kernel tests when it cannot be built."""
    lib = selective_scan_cpu.load_library()
    if lib is None:
        pytest.skip(f"compiled CPU scan unavailable: {selective_scan_cpu.KERNEL.error}")
    return lib.ecmnet_scan_lanes()


def make_inputs(batch: int, dim: int, length: int, n: int, groups: int, seed: int = 0, optional: bool = True,
                delta_max: float | None = None) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    delta = (delta_max * torch.rand(batch, dim, length, generator=g) if delta_max
             else 0.5 * torch.randn(batch, dim, length, generator=g))
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": delta,
        "A": -torch.rand(dim, n, generator=g) * 2 - 0.1,
        "B": torch.randn(batch, groups, n, length, generator=g),
        "C": torch.randn(batch, groups, n, length, generator=g),
        "D": torch.randn(dim, generator=g) if optional else None,
        "z": torch.randn(batch, dim, length, generator=g) if optional else None,
        "delta_bias": 0.3 * torch.randn(dim, generator=g) if optional else None,
    }


def scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence written out for float64 ground truth; ``unbind`` keeps autograd's backward O(L)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = u.shape[1] // B.shape[1]
    Bc, Cc = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)
    h = u.new_zeros(*u.shape[:2], A.shape[1])
    ys = []
    for dt, ut, bt, ct in zip(delta.unbind(-1), u.unbind(-1), Bc.unbind(-1), Cc.unbind(-1)):
        h = torch.exp(dt[..., None] * A) * h + (dt * ut)[..., None] * bt
        ys.append((h * ct).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def run(fn, inputs, dtype, softplus=True, seed=1, **kwargs):
    """Output and gradients of every given input for the loss <y, g> with a fixed random g."""
    leaves = {k: (v.to(dtype).requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    y = fn(*[leaves[k] for k in NAMES], delta_softplus=softplus, **kwargs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    (y * g).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    expected = expected.double()
    err = (actual.double() - expected).abs()
    tol = RTOL * expected.abs() + ATOL_REL * expected.abs().max().clamp_min(1e-30)
    assert bool((err <= tol).all()), f"{what}: max excess {(err - tol).max().item():.3e}"


def check_against_reference(inputs, softplus=True, **kwargs) -> None:
    y_ref, g_ref = run(scan64, inputs, torch.float64, softplus)
    y, grads = run(selective_scan_cpu.selective_scan_cpu, inputs, torch.float32, softplus, **kwargs)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, "output")
    for name, ref in g_ref.items():
        assert_close(grads[name], ref, f"grad {name}")


# ---------------------------------------------------------------------------------------------------------------
# exactness on the kernel's code paths


@pytest.mark.parametrize("n", [16, 5], ids=["N16-specialised", "N5-generic"])
@pytest.mark.parametrize("length", [1, 7, 64, 257])
def test_matches_float64_reference(lanes: int, n: int, length: int) -> None:
    # Two groups of lanes + 3 channels each: one full and one partial tile per group.
    inputs = make_inputs(batch=2, dim=2 * (lanes + 3), length=length, n=n, groups=2)
    check_against_reference(inputs)


def test_large_steps_and_no_optional_inputs(lanes: int) -> None:
    """delta up to ~5 without softplus (exp(delta*A) underflows for large |A|), and no D, z, delta_bias."""
    inputs = make_inputs(batch=1, dim=lanes, length=300, n=16, groups=1, optional=False, delta_max=5.0)
    check_against_reference(inputs, softplus=False)


def test_several_backward_parts(lanes: int, threads) -> None:
    """batch 1 and one group with 2 threads: the backward splits the group into parts with their own dB/dC."""
    threads(2)
    inputs = make_inputs(batch=1, dim=4 * lanes, length=130, n=16, groups=1)
    check_against_reference(inputs)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunk_size_does_not_change_results(lanes: int, chunk: int) -> None:
    inputs = make_inputs(batch=2, dim=lanes + 1, length=100, n=16, groups=1)
    y64, g64 = run(selective_scan_cpu.selective_scan_cpu, inputs, torch.float32)
    y, grads = run(selective_scan_cpu.selective_scan_cpu, inputs, torch.float32, chunk=chunk)
    torch.testing.assert_close(y, y64, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], g64[name], rtol=1e-4, atol=1e-5, msg=name)


def test_thread_count_does_not_change_results(lanes: int, threads) -> None:
    inputs = make_inputs(batch=3, dim=3 * lanes, length=90, n=16, groups=3)
    threads(1)
    y1, g1 = run(selective_scan_cpu.selective_scan_cpu, inputs, torch.float32)
    threads(2)
    y2, g2 = run(selective_scan_cpu.selective_scan_cpu, inputs, torch.float32)
    assert torch.equal(y1, y2)  # tiles are independent in the forward: bit-identical
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-6, msg=name)


def test_last_state_and_3d_bc(lanes: int) -> None:
    inputs = make_inputs(batch=2, dim=lanes, length=50, n=16, groups=1)
    inputs["B"], inputs["C"] = inputs["B"][:, 0], inputs["C"][:, 0]  # (batch, N, L)
    args = [inputs[k] for k in NAMES]
    y_ref, h_ref = selective_scan_ref(*[a.double() if a is not None else None for a in args], delta_softplus=True,
                                      return_last_state=True)
    y, h = selective_scan_cpu.selective_scan_cpu(*args, delta_softplus=True, return_last_state=True)
    assert h.shape == (2, lanes, 16)
    assert_close(y, y_ref, "output")
    assert_close(h, h_ref, "last state")


# ---------------------------------------------------------------------------------------------------------------
# inference path, memory, dtypes, edge sizes


def test_inference_path_builds_no_graph_and_matches(lanes: int) -> None:
    inputs = make_inputs(batch=1, dim=lanes, length=200, n=16, groups=1)
    args = [inputs[k] for k in NAMES]
    with torch.no_grad():
        leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
        y_fast = selective_scan_cpu.selective_scan_cpu(*leaves, delta_softplus=True)
    assert y_fast.grad_fn is None
    y_grad, _ = run(selective_scan_cpu.selective_scan_cpu, inputs, torch.float32)
    assert torch.equal(y_fast, y_grad)


def test_backward_keeps_only_chunk_boundary_states(lanes: int) -> None:
    inputs = make_inputs(batch=1, dim=lanes, length=1000, n=16, groups=1)
    leaves = [v.requires_grad_(True) if v is not None else None for v in (inputs[k] for k in NAMES)]
    y = selective_scan_cpu.selective_scan_cpu(*leaves, delta_softplus=True, chunk=64)
    states = y.grad_fn.saved_tensors[-1]
    assert states.shape == (1, lanes, 16, 16)  # (batch, dim, ceil(1000 / 64), N): no (batch, dim, L, N) tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_follows_u(lanes: int, dtype: torch.dtype) -> None:
    inputs = make_inputs(batch=1, dim=lanes, length=20, n=16, groups=1)
    args = [v.to(dtype) if v is not None else None for v in (inputs[k] for k in NAMES)]
    y = selective_scan_cpu.selective_scan_cpu(*args, delta_softplus=True)
    ref = scan64(*[a.double() if a is not None else None for a in args], delta_softplus=True)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_empty_sizes(lanes: int) -> None:
    zero_len = make_inputs(batch=2, dim=lanes, length=0, n=16, groups=1)
    y, h = selective_scan_cpu.selective_scan_cpu(*[zero_len[k] for k in NAMES], delta_softplus=True,
                                                 return_last_state=True)
    assert y.shape == (2, lanes, 0) and bool((h == 0).all())
    zero_batch = make_inputs(batch=0, dim=lanes, length=5, n=16, groups=1)
    assert selective_scan_cpu.selective_scan_cpu(*[zero_batch[k] for k in NAMES]).shape == (0, lanes, 5)


def test_non_contiguous_inputs(lanes: int) -> None:
    inputs = make_inputs(batch=2, dim=lanes, length=40, n=16, groups=1)
    inputs["u"] = inputs["u"].transpose(0, 1).contiguous().transpose(0, 1)
    inputs["B"] = inputs["B"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not inputs["u"].is_contiguous() and not inputs["B"].is_contiguous()
    check_against_reference(inputs)


# ---------------------------------------------------------------------------------------------------------------
# dispatch and errors


def test_dispatch_by_argument_and_environment(lanes: int, monkeypatch) -> None:
    assert available_backends("cpu")[0] == "cpp"  # fastest first
    assert resolve_backend(None, "cpu") == "cpp"
    inputs = make_inputs(batch=1, dim=lanes, length=30, n=16, groups=1)
    args = [inputs[k] for k in NAMES]
    y_cpp = selective_scan_fn(*args, delta_softplus=True, backend="cpp")
    y_torch = selective_scan_fn(*args, delta_softplus=True, backend="torch")
    torch.testing.assert_close(y_cpp, y_torch, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("ECMNET_SCAN_BACKEND", "cpp")
    assert resolve_backend(None, "cpu") == "cpp"
    assert torch.equal(selective_scan_fn(*args, delta_softplus=True), y_cpp)


def test_cuda_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="'cpp' needs CPU tensors"):
        resolve_backend("cpp", "cuda")


@pytest.mark.parametrize("change, message", [
    (lambda x: x.update(delta=x["delta"][..., :-1]), "u and delta"),
    (lambda x: x.update(A=x["A"][:-1]), "A must be"),
    (lambda x: x.update(B=x["B"][..., :-1]), "B must be"),
    (lambda x: x.update(C=x["C"][:, :, :-1]), "C must be"),
    (lambda x: x.update(D=x["D"][:-1]), "D must be"),
    (lambda x: x.update(delta_bias=x["delta_bias"][:-1]), "delta_bias must be"),
    (lambda x: x.update(z=x["z"][:, :-1]), "z must be"),
    (lambda x: x.update(B=x["B"].repeat(1, 3, 1, 1), C=x["C"].repeat(1, 3, 1, 1)), "divisible"),
], ids=["delta", "A", "B", "C", "D", "delta_bias", "z", "groups"])
def test_bad_shapes_name_the_input(lanes: int, change, message: str) -> None:
    inputs = make_inputs(batch=1, dim=8, length=10, n=16, groups=2)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        selective_scan_cpu.selective_scan_cpu(*[inputs[k] for k in NAMES])


# ---------------------------------------------------------------------------------------------------------------
# build, cache and fallback


def test_portable_build_is_cached_and_correct(tmp_path: Path, monkeypatch) -> None:
    """A build without -march=native into an empty cache compiles once; a second loader reuses the file."""
    if cbuild.find_compiler() is None:
        pytest.skip("no C++ compiler")
    first = selective_scan_cpu.KERNEL.new_loader(cache=tmp_path, native=False)
    lib = first.load()
    assert lib is not None, first.error
    assert first.info.compiled and first.info.path.parent == tmp_path and "-march=native" not in first.info.flags
    second = selective_scan_cpu.KERNEL.new_loader(cache=tmp_path, native=False)
    assert second.load() is not None and not second.info.compiled and second.info.path == first.info.path
    assert not list(tmp_path.glob("*.tmp"))  # atomic build leaves no temporary files
    # The portable build (other SIMD width, other tiles) is exact too.
    monkeypatch.setattr(selective_scan_cpu.KERNEL, "loader", second)
    inputs = make_inputs(batch=2, dim=2 * (lib.ecmnet_scan_lanes() + 3), length=70, n=16, groups=2)
    check_against_reference(inputs)


def test_fallback_without_compiler_warns_once(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(selective_scan_cpu.KERNEL, "loader", selective_scan_cpu.KERNEL.new_loader(cache=tmp_path))
    with pytest.warns(RuntimeWarning, match="unavailable: C\\+\\+ compiler .*no-such-compiler.* does not run"):
        assert resolve_backend("cpp", "cpu") == "torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "cpp" not in available_backends("cpu")
        assert resolve_backend(None, "cpu") == "torch"
        inputs = make_inputs(batch=1, dim=4, length=12, n=4, groups=1)
        args = [inputs[k] for k in NAMES]
        y = selective_scan_fn(*args, delta_softplus=True, backend="cpp")
    assert not [w for w in caught if "unavailable" in str(w.message)]  # warned once only
    torch.testing.assert_close(y, selective_scan_fn(*args, delta_softplus=True, backend="torch"))
    with pytest.raises(RuntimeError, match="unavailable"):
        selective_scan_cpu.selective_scan_cpu(*args)


def test_compile_error_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo fakecc 1.0; exit 0; fi\n'
                    'echo "fakecc: internal error" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    loader = selective_scan_cpu.KERNEL.new_loader(compiler=str(fake), cache=tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="compiling the kernel failed"):
        assert loader.load() is None
    assert "fakecc: internal error" in loader.error and "-march=native" in loader.error  # both flag sets tried
    assert not list((tmp_path / "cache").iterdir())


def test_cache_dir_follows_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ECMNET_CACHE_DIR", str(tmp_path))
    assert selective_scan_cpu.KERNEL.cache_dir() == tmp_path / "selective_scan_cpu"
    monkeypatch.delenv("ECMNET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert selective_scan_cpu.KERNEL.cache_dir() == tmp_path / "xdg" / "ecmnet" / "selective_scan_cpu"
    assert os.fspath(selective_scan_cpu.KERNEL.source).endswith(os.path.join("csrc", "selective_scan_cpu.cpp"))
