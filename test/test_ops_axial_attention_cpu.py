"""Compiled CPU axial attention (``cpp`` backend of DDA): the kernel against float64 PyTorch math for the key widths,
channel counts and map sizes DDA uses (1xN, Nx1, odd sizes, partial SIMD vectors, batch 2, both memory formats),
softmax stability for large logits, several thread counts, input validation; DDA with the kernel equal to DDA with
PyTorch; the dispatcher (autograd keeps PyTorch and correct gradients, tracing records the custom op, the
environment variable and the per-model setting); the fallback when the library cannot be built, and the shared
build machinery. Kernel tests skip when no compiler can build the library."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from ecmnet_core.model import DDA
from ecmnet_core.model.attention import set_attention_backend
from ecmnet_core.ops import axial_attention, axial_attention_cpu, cbuild
from ecmnet_core.ops.axial_attention import axial_attention_torch, resolve_backend

RTOL = 1e-5  # against float64: |out - ref| <= RTOL * max|ref| (+ the same relative to each element)


@pytest.fixture(scope="module")
def lanes() -> int:
    """Key lanes of the built library; skips the kernel tests when it cannot be built."""
    lib = axial_attention_cpu.load_library()
    if lib is None:
        pytest.skip(f"compiled CPU axial attention unavailable: {axial_attention_cpu.KERNEL.error}")
    return lib.ecmnet_attn_lanes()


def make_qkv(batch: int, dk: int, c: int, h: int, w: int, seed: int = 0, channels_last: bool = True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, h, w, generator=gen) for n in (dk, dk, c))
    if channels_last:
        q, k, v = (t.contiguous(memory_format=torch.channels_last) for t in (q, k, v))
    return q, k, v


def check(q, k, v, scale: float, rtol: float = RTOL) -> torch.Tensor:
    ref = axial_attention_torch(q.double(), k.double(), v.double(), scale)
    out = axial_attention_cpu.axial_attention_cpu(q, k, v, scale)
    assert out.shape == v.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.double() - ref).abs()
    bound = rtol * (ref.abs().max() + ref.abs())
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# kernel


@pytest.mark.parametrize("dk,c", [(1, 8), (2, 8), (4, 32), (8, 64), (1, 32), (8, 8), (2, 64)])
@pytest.mark.parametrize("hw", [(23, 30), (1, 9), (9, 1), (1, 1), (17, 5)])
def test_kernel_matches_float64(lanes: int, dk: int, c: int, hw: tuple[int, int]) -> None:
    q, k, v = make_qkv(2, dk, c, *hw, seed=dk * 100 + c)
    check(q, k, v, 1.0 / math.sqrt(dk))


@pytest.mark.parametrize("channels_last", [True, False])
def test_both_memory_formats(lanes: int, channels_last: bool) -> None:
    q, k, v = make_qkv(2, 4, 32, 13, 2 * lanes + 3, seed=3, channels_last=channels_last)
    check(q, k, v, 0.5)


@pytest.mark.parametrize("c", [3, 13, 16, 20, 24, 40, 48])
def test_channel_counts_off_the_vector_width(lanes: int, c: int) -> None:
    """Partial channel vectors (C not a multiple of 8) and partial channel blocks, under both register blockings
    of the AVX2 build (6 queries x 2 vectors for C <= 16 or > 32, 4 x 4 in between; sequence lengths 11 and
    lanes + 1 leave partial query blocks)."""
    q, k, v = make_qkv(1, 3, c, 11, lanes + 1, seed=c)
    check(q, k, v, 0.6)


def test_sequence_lengths_around_the_lane_count(lanes: int) -> None:
    """Rows and columns of lanes - 1, lanes, lanes + 1 keys, and query blocks with 1..4 valid rows."""
    for h, w in [(lanes - 1, lanes + 1), (lanes, lanes), (5, 2 * lanes + 2), (6, 7)]:
        q, k, v = make_qkv(1, 2, 16, h, w, seed=h * w)
        check(q, k, v, 0.7)


def test_large_logits_are_stable(lanes: int) -> None:
    """scale * q.k up to ~80 (and down to ~-80): the row max is subtracted, so nothing overflows or vanishes.

    fp32 logits of magnitude 80 carry an absolute error of ~1e-5 (also in PyTorch's fp32 math), so the tolerance
    against float64 is looser here.
    """
    q, k, v = make_qkv(1, 4, 32, 19, 27, seed=7)
    q, k = q * 6.0, k * 6.0  # |scale * q.k| up to ~100
    scale = 0.5
    logits = scale * torch.einsum("bdhw,bdhx->bhwx", q, k)
    assert logits.abs().max() > 60
    out = check(q, k, v, scale, rtol=2e-4)
    assert torch.isfinite(out).all()
    # all-negative rows: the max, not 0, is subtracted (else every weight would underflow to 0)
    q2, k2, v2 = make_qkv(1, 1, 8, 6, 9, seed=8)
    q2 = torch.full_like(q2, -10.0)
    k2 = k2.abs() + 1.0
    check(q2, k2, v2, 10.0, rtol=2e-4)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_thread_counts_agree(lanes: int, threads, n: int) -> None:
    q, k, v = make_qkv(2, 4, 32, 90, 120, seed=11)  # large enough to start a team
    threads(1)
    ref = axial_attention_cpu.axial_attention_cpu(q, k, v, 0.5)
    threads(n)
    torch.testing.assert_close(axial_attention_cpu.axial_attention_cpu(q, k, v, 0.5), ref, rtol=0, atol=0)


def test_empty_and_invalid_inputs(lanes: int) -> None:
    q, k, v = make_qkv(0, 2, 8, 5, 4)
    assert axial_attention_cpu.axial_attention_cpu(q, k, v, 1.0).shape == (0, 8, 5, 4)
    q, k, v = make_qkv(1, 2, 8, 5, 4)
    with pytest.raises(ValueError, match="same shape"):
        axial_attention_cpu.axial_attention_cpu(q, k[:, :1], v, 1.0)
    with pytest.raises(ValueError, match="v must be"):
        axial_attention_cpu.axial_attention_cpu(q, k, v[..., :3], 1.0)
    with pytest.raises(ValueError, match="float32"):
        axial_attention_cpu.axial_attention_cpu(q.double(), k.double(), v.double(), 1.0)
    with pytest.raises(ValueError, match=r"\(B, channels, H, W\)"):
        axial_attention_cpu.axial_attention_cpu(q[0], k[0], v[0], 1.0)
    lib = axial_attention_cpu.load_library()
    assert lib.ecmnet_axial_attention(None, None, None, None, 1, 0, 8, 5, 4, 1.0, 1) == 1  # dk < 1
    assert lib.ecmnet_axial_attention(None, None, None, None, 1, 2, 8, 5, 4, 1.0, 1) == 2  # null pointers


# ---------------------------------------------------------------------------------------------------------------
# DDA and the dispatcher


def make_dda(c: int, seed: int = 0) -> DDA:
    torch.manual_seed(seed)
    m = DDA(c).eval()
    with torch.no_grad():
        m.gamma.fill_(0.73)  # nonzero, so the attention shows in the output
    return m


@pytest.mark.parametrize("c,h,w", [(8, 23, 30), (32, 12, 17), (64, 9, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_dda_cpp_equals_torch(lanes: int, c: int, h: int, w: int, channels_last: bool) -> None:
    m = make_dda(c)
    x = torch.randn(2, c, h, w)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        m.backend = "torch"
        ref = m(x)
        m.backend = "cpp"
        out = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert resolve_backend(*_qkv(m, x), backend=None) == "cpp"  # what inference uses by default


def _qkv(m: DDA, x: torch.Tensor):
    with torch.no_grad():
        return m.query(x), m.key(x), m.value(x)


def test_autograd_keeps_torch_with_correct_gradients(lanes: int, monkeypatch) -> None:
    """With gradients needed the kernel (no backward) is never called, even when requested; gradients match
    float64 finite differences (gradcheck of the PyTorch path through the dispatcher)."""
    def fail(*args, **kwargs):
        raise AssertionError("kernel called although gradients are needed")

    m = make_dda(8).train()
    x = torch.randn(1, 8, 5, 6, requires_grad=True)
    monkeypatch.setattr(axial_attention_cpu, "axial_attention_cpu", fail)
    m.backend = "cpp"
    m(x).square().sum().backward()
    assert x.grad is not None and m.query.weight.grad is not None and m.gamma.grad is not None
    q, k, v = (torch.randn(1, n, 4, 5, requires_grad=True) for n in (2, 2, 3))
    out = axial_attention.axial_attention(q, k, v, 0.7, backend="cpp")
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = axial_attention_torch(*ref_inputs, 0.7)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for t, r in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(t.grad, r.grad.float(), rtol=1e-4, atol=1e-5)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: axial_attention.axial_attention(a, b, c, 0.7), (q64, k64, v64))


def test_no_grad_and_tracing_choices(lanes: int) -> None:
    q, k, v = make_qkv(1, 2, 8, 4, 5)
    q.requires_grad_(True)
    assert resolve_backend(q, k, v) == "cpp"  # with autograd: the training kernels (axial_attention_backward_cpu)
    assert resolve_backend(q, k, v, backend="torch") == "torch"
    with torch.no_grad():
        assert resolve_backend(q, k, v) == "cpp"
    assert resolve_backend(q.detach(), k, v) == "cpp"  # nothing requires grad
    assert resolve_backend(q.detach().double(), k.double(), v.double()) == "torch"  # other dtypes: PyTorch
    with pytest.raises(ValueError, match="float32 CPU"):
        resolve_backend(q.detach().double(), k.double(), v.double(), backend="cpp")
    m = make_dda(8)
    x = torch.randn(1, 8, 5, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated; ONNX export still uses it
        traced = torch.jit.trace(m, x)  # records the kernel as its custom op, not an opaque ctypes call
    graph = str(traced.inlined_graph)
    assert "ecmnet::axial_attention_cpu" in graph and "aten::softmax" not in graph
    torch.testing.assert_close(traced(x), m(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(m, x, check_trace=False)  # with autograd: PyTorch ops (the check runs without)
    assert "aten::softmax" in str(traced.inlined_graph)


def test_environment_variable_and_model_setting(lanes: int, monkeypatch) -> None:
    calls = []
    real = axial_attention_cpu.axial_attention_cpu

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(axial_attention_cpu, "axial_attention_cpu", counting)
    m = make_dda(16)
    x = torch.randn(1, 16, 7, 8)
    with torch.inference_mode():
        monkeypatch.setenv("ECMNET_ATTENTION_BACKEND", "torch")
        m(x)
        assert not calls
        monkeypatch.setenv("ECMNET_ATTENTION_BACKEND", "cpp")
        m(x)
        assert len(calls) == 1
        monkeypatch.setenv("ECMNET_ATTENTION_BACKEND", "auto")
        m(x)
        assert len(calls) == 2
        assert set_attention_backend(m, "torch") == 1  # the model's setting wins over the environment
        m(x)
        assert len(calls) == 2
        set_attention_backend(m, None)
        monkeypatch.setenv("ECMNET_ATTENTION_BACKEND", "fast")
        with pytest.raises(ValueError, match="ECMNET_ATTENTION_BACKEND"):
            m(x)
    with pytest.raises(ValueError, match="unknown"):
        set_attention_backend(m, "fast")


def test_fallback_when_library_unavailable(monkeypatch, tmp_path: Path) -> None:
    """No compiler: one warning, then DDA runs on PyTorch with the same result, also with cpp requested."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(axial_attention_cpu.KERNEL, "loader", axial_attention_cpu.KERNEL.new_loader(cache=tmp_path))
    m = make_dda(8)
    x = torch.randn(1, 8, 6, 7)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="axial attention unavailable: C\\+\\+ compiler .* does not run"):
            out = m(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.backend = "cpp"
            out_cpp = m(x)
            m.backend = "torch"
            ref = m(x)
    assert not [w for w in caught if "unavailable" in str(w.message)]  # warned once only
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_cpp, ref)
    assert not axial_attention_cpu.is_available()
    with pytest.raises(RuntimeError, match="unavailable"):
        axial_attention_cpu.axial_attention_cpu(*_qkv(m, x), 1.0)


def test_portable_build_is_cached(tmp_path: Path, monkeypatch) -> None:
    """The shared build machinery with the attention kernel: a portable build compiles once, then is reused."""
    if cbuild.find_compiler() is None:
        pytest.skip("no C++ compiler")
    first = axial_attention_cpu.KERNEL.new_loader(cache=tmp_path, native=False)
    assert first.load() is not None, first.error
    assert first.info.compiled and first.info.path.name.startswith("axial_attention_cpu_")
    second = axial_attention_cpu.KERNEL.new_loader(cache=tmp_path, native=False)
    assert second.load() is not None and not second.info.compiled and second.info.path == first.info.path
    # the portable build (other lane count) is exact too
    monkeypatch.setattr(axial_attention_cpu.KERNEL, "loader", second)
    q, k, v = make_qkv(2, 2, 16, 13, 21, seed=5)
    check(q, k, v, 0.7)


def test_cache_dir_is_per_kernel(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ECMNET_CACHE_DIR", str(tmp_path))
    assert cbuild.cache_dir("axial_attention_cpu") == tmp_path / "axial_attention_cpu"
    loader = axial_attention_cpu.KERNEL.new_loader()
    assert loader.cache_name == "axial_attention_cpu"
    # OpenMP (PyTorch's threads) first, native then portable; a plain portable build is the last resort
    assert loader._flag_sets() == [cbuild.BASE_FLAGS + ("-fopenmp",) + cbuild.NATIVE_FLAGS,
                                   cbuild.BASE_FLAGS + ("-fopenmp",), cbuild.BASE_FLAGS]
    source = axial_attention_cpu.KERNEL.source
    assert source.name == "axial_attention_cpu.cpp" and source.is_file()


def test_build_without_openmp_uses_its_own_threads(tmp_path: Path, monkeypatch, threads) -> None:
    """The last-resort build (no -fopenmp): a per-call std::thread team with a barrier between rows and columns."""
    if cbuild.find_compiler() is None:
        pytest.skip("no C++ compiler")
    loader = axial_attention_cpu.KERNEL.new_loader(cache=tmp_path, native=False, extra_flags=())
    assert loader.load() is not None, loader.error
    assert "-fopenmp" not in loader.info.flags
    monkeypatch.setattr(axial_attention_cpu.KERNEL, "loader", loader)
    q, k, v = make_qkv(2, 4, 32, 90, 120, seed=13)  # large enough to start a team
    threads(1)
    ref = check(q, k, v, 0.5)
    threads(3)
    torch.testing.assert_close(axial_attention_cpu.axial_attention_cpu(q, k, v, 0.5), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dk,c,hw", [(4, 32, (23, 30)), (1, 8, (9, 1)), (8, 64, (5, 17)), (2, 12, (1, 1))])
def test_stacked_qkv_reads_the_slices_in_place(lanes: int, dk: int, c: int, hw: tuple[int, int]) -> None:
    """q, k, v as channel slices of one channels-last tensor (DDA's projections as one convolution) give the
    separate kernel's result."""
    qkv = torch.randn(2, 2 * dk + c, *hw, generator=torch.Generator().manual_seed(dk)).contiguous(
        memory_format=torch.channels_last)
    q, k, v = qkv.split([dk, dk, c], dim=1)
    ref = axial_attention_cpu.axial_attention_cpu(q, k, v, 0.5)
    out = axial_attention_cpu.axial_attention_qkv_cpu(qkv, dk, 0.5)
    assert out.shape == v.shape and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="too few"):
        axial_attention_cpu.axial_attention_qkv_cpu(qkv[:, : 2 * dk], dk, 0.5)


def test_dda_with_stacked_projections_equals_dda(lanes: int) -> None:
    from ecmnet_core.model.fuse import stack_dda_projections

    dda = DDA(32).eval()
    with torch.no_grad():
        dda.gamma.fill_(0.8)
    x = torch.randn(1, 32, 12, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = dda(x)
        assert stack_dda_projections(dda) == 1
        assert torch.allclose(dda(x), ref, rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    dda(x).sum().backward()  # under autograd the separate projections (and PyTorch attention) are used
    assert x.grad is not None
