"""Triton selective scan (``ecmnet_core.ops.scan_triton``): values and gradients against the float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter, which Triton selects when a kernel is decorated, i.e. when
the module is imported with ``TRITON_INTERPRET=1``. This pytest process may already hold the module compiled for the
GPU (or must keep it so for the CUDA test), so the interpreter cases run once in a subprocess (this file with
``--worker``) that reports one JSON record per case; each case is then its own test here. The CUDA test compares
with the ``torch`` backend at the FFM shape using mamba-ssm's fp32 tolerances; it is skipped without CUDA.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from ecmnet_core.ops import scan_triton  # noqa: E402
from ecmnet_core.ops.scan_triton import TritonScanConfig, selective_scan_triton  # noqa: E402
from ecmnet_core.ops.selective_scan import selective_scan_fn, selective_scan_ref  # noqa: E402

RTOL, ATOL_REL = 1e-4, 1e-5  # against float64: atol = ATOL_REL * max|reference|
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@dataclass(frozen=True)
class Case:
    """One interpreter check. Small shapes: the interpreter runs every program in numpy."""

    id: str
    batch: int = 2
    dim: int = 8
    groups: int = 2  # 0: B/C given as (batch, N, L)
    n_states: int = 4
    length: int = 33
    D: bool = True
    z: bool = True
    delta_bias: bool = True
    softplus: bool = True
    delta_scale: float = 0.5
    dtype: str = "float32"
    config: dict = field(default_factory=lambda: {"block_d": 2, "chunk": 16})


CASES = [
    # multi-chunk with a partial last chunk; two channel blocks per group -> dB/dC by atomics
    Case("L33_all_options_atomic"),
    Case("L1_single_step", length=1),
    # one channel block per group -> dB/dC plain stores; no D/z/bias/softplus
    Case("L7_plain_stores", length=7, D=False, z=False, delta_bias=False, softplus=False, config={"block_d": 4}),
    # (batch, N, L) B/C, N = 3 padded to 4, 6 channels in blocks of 4 (padded channel lanes), 5 chunks of 8
    Case("L33_ungrouped_padded", dim=6, groups=0, n_states=3, z=False, delta_bias=False,
         config={"block_d": 4, "chunk": 8}),
    # large steps (delta up to ~5): decays underflow towards 0 inside a chunk
    Case("L33_large_delta", softplus=False, delta_bias=False, delta_scale=5.0, config={"block_d": 4, "chunk": 16}),
    # bf16 inputs: fp32 compute, output and gradients in the inputs' dtypes
    Case("L7_bfloat16", length=7, dtype="bfloat16"),
    Case("L0_empty", length=0),
]


def _inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    b, dim, n, length = case.batch, case.dim, case.n_states, case.length
    dtype = getattr(torch, case.dtype)
    bc_shape = (b, n, length) if case.groups == 0 else (b, case.groups, n, length)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "u": rnd(b, dim, length).to(dtype),
        "delta": (torch.rand(b, dim, length, generator=g) * case.delta_scale).to(dtype),
        "A": -(torch.rand(dim, n, generator=g) * 2 + 0.1),
        "B": rnd(*bc_shape).to(dtype),
        "C": rnd(*bc_shape).to(dtype),
        "D": rnd(dim) if case.D else None,
        "z": rnd(b, dim, length).to(dtype) if case.z else None,
        "delta_bias": rnd(dim) * 0.2 if case.delta_bias else None,
    }


def _run(fn, inputs: dict, case: Case, dtype: torch.dtype | None, **kwargs):
    """Output, last state and gradients (for a fixed random upstream gradient) of ``fn``."""
    leaves = {k: (None if v is None else (v if dtype is None else v.to(dtype)).detach().requires_grad_())
              for k, v in inputs.items()}
    out, last = fn(*leaves.values(), delta_softplus=case.softplus, return_last_state=True, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(upstream.to(out.dtype))
    # a leaf that does not reach the output (A at L = 0) has no .grad: its gradient is zero
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items() if v is not None}
    return out, last, grads


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol_rel: float) -> dict:
    got, ref = got.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    atol = atol_rel * scale
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    ok = got.shape == ref.shape and bool(torch.allclose(got, ref, rtol=rtol, atol=atol))
    return {"name": name, "ok": ok, "max_err": err, "max_ref": scale, "shape": list(got.shape)}


def _check_case(case: Case) -> dict:
    """Runs in the interpreter subprocess: triton (fp32 compute) vs the float64 reference."""
    inputs = _inputs(case)
    config = TritonScanConfig(**case.config)
    out, last, grads = _run(selective_scan_triton, inputs, case, None, config=config)
    ref_out, ref_last, ref_grads = _run(selective_scan_ref, inputs, case, torch.float64)
    low = case.dtype != "float32"  # bf16 storage: mamba-ssm's bf16 tolerances
    rtol, atol_rel = (3e-2, 5e-2) if low else (RTOL, ATOL_REL)
    checks = [_compare("out", out, ref_out, rtol, atol_rel), _compare("last_state", last, ref_last, rtol, atol_rel)]
    checks += [_compare(f"grad_{k}", grads[k], ref_grads[k], rtol, atol_rel) for k in GRAD_NAMES if k in grads]
    dtypes_ok = out.dtype == inputs["u"].dtype and all(grads[k].dtype == inputs[k].dtype for k in grads)
    checks.append({"name": "dtypes", "ok": dtypes_ok, "out": str(out.dtype),
                   "grads": {k: str(v.dtype) for k, v in grads.items()}})
    return {"case": case.id, "checks": checks}


def _worker() -> None:
    assert scan_triton.interpreting(), "the worker must run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    for case in CASES:
        print(json.dumps(_check_case(case)), flush=True)


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in records}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_interpreter_matches_float64_reference(case: Case, interpreter_results: dict) -> None:
    """Output, last state and all eight gradients agree with the float64 sequential loop (Triton interpreter)."""
    assert case.id in interpreter_results, f"worker reported no result for {case.id}"
    bad = [c for c in interpreter_results[case.id]["checks"] if not c["ok"]]
    assert not bad, f"{case.id}: mismatches {json.dumps(bad, indent=1)}"


# ---------------------------------------------------------------------------------------------------------------
# in-process: argument checking and the optional dependency


def _small() -> dict[str, torch.Tensor]:
    return {"u": torch.randn(1, 4, 5), "delta": torch.rand(1, 4, 5), "A": -torch.rand(4, 2),
            "B": torch.randn(1, 2, 2, 5), "C": torch.randn(1, 2, 2, 5)}


@pytest.mark.parametrize(("override", "message"), [
    ({"delta": torch.rand(1, 4, 6)}, "delta shape"),
    ({"A": -torch.rand(3, 2)}, "A must be (dim=4, N)"),
    ({"A": torch.randn(4, 2, dtype=torch.complex64)}, "complex A"),
    ({"B": torch.randn(1, 3, 2, 5), "C": torch.randn(1, 3, 2, 5)}, "not divisible by the 3 groups"),
    ({"B": torch.randn(1, 2, 3, 5), "C": torch.randn(1, 2, 3, 5)}, "N=3 states, A has 2"),
    ({"C": torch.randn(1, 2, 2, 4)}, "C must be (batch=1, G, N, L=5)"),
    ({"u": torch.randn(4, 5)}, "u must be (batch, dim, L)"),
])
def test_bad_arguments_name_the_parameter(override: dict, message: str) -> None:
    args = {**_small(), **override}
    with pytest.raises(ValueError, match=re.escape(message)):
        selective_scan_triton(**args)


def test_bad_vector_shapes() -> None:
    with pytest.raises(ValueError, match="D must be"):
        selective_scan_triton(**_small(), D=torch.ones(3))
    with pytest.raises(ValueError, match="delta_bias must be"):
        selective_scan_triton(**_small(), delta_bias=torch.ones(4, 1))


def test_config_must_be_powers_of_two() -> None:
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        TritonScanConfig(chunk=48)


@pytest.mark.skipif(scan_triton.interpreting(), reason="this process runs the Triton interpreter")
def test_cpu_tensors_without_interpreter_are_refused() -> None:
    assert scan_triton.triton_available() == torch.cuda.is_available()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        selective_scan_triton(**_small())


def test_module_imports_without_triton() -> None:
    """The backend is optional: without triton the module imports, reports unavailable and raises on use."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from ecmnet_core.ops.scan_triton import selective_scan_triton, triton_available\n"
        "assert not triton_available()\n"
        "x = torch.zeros(1, 2, 3)\n"
        "try:\n"
        "    selective_scan_triton(x, x, torch.zeros(2, 1), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels against the torch backend at the FFM shape


def _ffm_inputs(batch: int, length: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """SS2D-like inputs: 4 directions x 256 channels, N = 16, mamba's dt and A initialisation."""
    g = torch.Generator(device=device).manual_seed(seed)
    k, d_inner, n = 4, 256, 16
    dim = k * d_inner

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device)

    dt = torch.exp(torch.rand(dim, generator=g, device=device) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    return {
        "u": rnd(batch, dim, length), "delta": rnd(batch, dim, length) * 0.5,
        "A": -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(dim, 1),
        "B": rnd(batch, k, n, length), "C": rnd(batch, k, n, length), "D": torch.ones(dim, device=device),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus, as mamba initialises it
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(scan_triton.interpreting(), reason="TRITON_INTERPRET=1 is set: kernels are not compiled")
@pytest.mark.parametrize("length", [690, 8192])
def test_cuda_matches_torch_backend_ffm_shape(length: int) -> None:
    inputs = _ffm_inputs(1, length, "cuda")
    results = []
    for fn in (selective_scan_triton, lambda *a, **kw: selective_scan_fn(*a, **kw, backend="torch")):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                       delta_bias=leaves["delta_bias"], delta_softplus=True, return_last_state=True)
        upstream = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
        out.backward(upstream)
        results.append({"out": out, "last_state": last, **{f"grad_{k}": v.grad for k, v in leaves.items()}})
    got, ref = results
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=6e-4, atol=2e-3, msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
