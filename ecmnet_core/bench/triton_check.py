"""GPU check of the Triton selective scan: agreement and timings against the ``torch`` backend (and mamba-ssm).

Run on a CUDA machine::

    python -m ecmnet_core.bench.triton_check            # agreement + timings at the FFM shapes
    python -m ecmnet_core.bench.triton_check --sweep    # also time alternative TritonScanConfigs

Shapes are SS2D's (4 directions x 256 channels, N = 16, B/C grouped by direction): L = 690 at batch 8 and
L = 2048, 8192 at batch 1. For each it prints the largest absolute error of the output and of every gradient
(relative to the largest reference value) with pass/fail at mamba-ssm's fp32 tolerances (rtol 6e-4, atol 2e-3),
then median forward and forward+backward times (CUDA events) and peak memory. A small all-options case is
first checked against the float64 sequential reference. Exit status: 0 all agreed, 1 a mismatch, 2 no CUDA/triton.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ecmnet_core.ops import scan_triton
from ecmnet_core.ops.scan_triton import TritonScanConfig, selective_scan_triton
from ecmnet_core.ops.selective_scan import available_backends, selective_scan_fn, selective_scan_ref

RTOL, ATOL = 6e-4, 2e-3  # mamba-ssm's fp32 tolerances (tests/ops/test_selective_scan.py)
SHAPES = ((8, 690), (1, 2048), (1, 8192))
SWEEP = (
    TritonScanConfig(block_d=4, chunk=32, num_warps_fwd=4, num_warps_bwd=8),
    TritonScanConfig(block_d=2, chunk=32, num_warps_fwd=4, num_warps_bwd=4),
    TritonScanConfig(block_d=8, chunk=16, num_warps_fwd=4, num_warps_bwd=4),
    TritonScanConfig(block_d=8, chunk=32, num_warps_fwd=8, num_warps_bwd=8),
    TritonScanConfig(block_d=4, chunk=64, num_warps_fwd=8, num_warps_bwd=8),
    TritonScanConfig(block_d=2, chunk=64, num_warps_fwd=4, num_warps_bwd=8),
    TritonScanConfig(block_d=1, chunk=128, num_warps_fwd=4, num_warps_bwd=4),
)
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")

ScanFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def ffm_inputs(batch: int, length: int, k: int = 4, d_inner: int = 256, n: int = 16, seed: int = 0,
               device: str = "cuda") -> dict[str, torch.Tensor]:
    """SS2D-like scan inputs with mamba's initialisation of A (-1..-N) and dt (0.001..0.1 through softplus)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dim = k * d_inner
    dt = torch.exp(torch.rand(dim, generator=g, device=device) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    return {
        "u": torch.randn(batch, dim, length, generator=g, device=device),
        "delta": torch.randn(batch, dim, length, generator=g, device=device) * 0.5,
        "A": -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, k, n, length, generator=g, device=device),
        "C": torch.randn(batch, k, n, length, generator=g, device=device),
        "D": torch.ones(dim, device=device),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    }


def backend_fn(name: str, config: TritonScanConfig | None = None) -> ScanFn:
    if name == "triton":
        return lambda *a, **kw: selective_scan_triton(*a, **kw, config=config)
    return lambda *a, **kw: selective_scan_fn(*a, **kw, backend=name)


def run(fn: ScanFn, inputs: dict[str, torch.Tensor], grad: bool, upstream: torch.Tensor | None = None,
        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    leaves = {k: (v if dtype is None else v.to(dtype)).detach().requires_grad_(grad) for k, v in inputs.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                   z=leaves.get("z"), delta_bias=leaves["delta_bias"], delta_softplus=True, return_last_state=True)
    result = {"out": out, "last_state": last}
    if grad:
        out.backward(upstream.to(out.dtype))
        result.update({f"d{k}": v.grad for k, v in leaves.items()})
    return result


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float, atol: float) -> bool:
    ok_all = True
    cells = []
    for name, r in ref.items():
        g, r = got[name].double(), r.double()
        err = (g - r).abs().max().item()
        scale = r.abs().max().item()
        ok = bool(torch.allclose(g, r, rtol=rtol, atol=atol))
        ok_all &= ok
        cells.append(f"{name} {err:.1e} ({err / max(scale, 1e-30):.0e} rel){'' if ok else ' FAIL'}")
    print("    " + " | ".join(cells))
    return ok_all


def cuda_time(fn: Callable[[], object], reps: int, budget_s: float = 3.0) -> float:
    """Median milliseconds of ``fn`` over up to ``reps`` runs (fewer when one run is slow)."""
    fn()  # warm-up (compilation happened before)
    torch.cuda.synchronize()
    times = []
    start_wall = time.perf_counter()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - start_wall > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def timings(fn: ScanFn, inputs: dict[str, torch.Tensor], upstream: torch.Tensor, reps: int) -> dict[str, float]:
    def forward():
        with torch.no_grad():
            run(fn, inputs, grad=False)

    def forward_backward():
        run(fn, inputs, grad=True, upstream=upstream)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward_backward()  # first call: Triton compiles here
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    fwd = cuda_time(forward, reps)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd = cuda_time(forward_backward, reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"first_ms": first, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_mib": peak}


def check_reference(device: str) -> bool:
    """All options (D, z, delta_bias, softplus, groups) on a small shape against the float64 loop."""
    g = torch.Generator(device=device).manual_seed(3)
    b, dim, groups, n, length = 2, 64, 4, 16, 300
    inputs = {
        "u": torch.randn(b, dim, length, generator=g, device=device),
        "delta": torch.randn(b, dim, length, generator=g, device=device) * 0.5,
        "A": -torch.rand(dim, n, generator=g, device=device) * 4,
        "B": torch.randn(b, groups, n, length, generator=g, device=device),
        "C": torch.randn(b, groups, n, length, generator=g, device=device),
        "D": torch.randn(dim, generator=g, device=device),
        "delta_bias": torch.randn(dim, generator=g, device=device) * 0.2,
        "z": torch.randn(b, dim, length, generator=g, device=device),
    }
    upstream = torch.randn(b, dim, length, generator=g, device=device, dtype=torch.float64)
    got = run(backend_fn("triton"), inputs, True, upstream)
    ref = run(selective_scan_ref, inputs, True, upstream, dtype=torch.float64)
    ok = True
    print(f"float64 reference, batch {b} dim {dim} G {groups} N {n} L {length}, all options (rtol 1e-4, "
          "atol 1e-5*max|ref| per tensor):")
    for name, r in ref.items():
        gt, r = got[name].double(), r.double()
        atol = 1e-5 * r.abs().max().item()
        good = bool(torch.allclose(gt, r, rtol=1e-4, atol=atol))
        ok &= good
        print(f"    {name}: max err {(gt - r).abs().max().item():.2e} / max {r.abs().max().item():.2e}"
              f"{'' if good else '  FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecmnet_core.bench.triton_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (default 20)")
    parser.add_argument("--shapes", default=",".join(f"{b}x{L}" for b, L in SHAPES),
                        help="comma-separated BATCHxL list (default %(default)s)")
    parser.add_argument("--sweep", action="store_true", help="also time the TritonScanConfig alternatives")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch backend (timings of triton only)")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
        assert all(len(s) == 2 for s in shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes: expected BATCHxL[,BATCHxL...], got {args.shapes!r}")

    if not torch.cuda.is_available() or not scan_triton.triton_available() or scan_triton.interpreting():
        print("triton_check needs a CUDA GPU and triton (without TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, triton "
          f"{triton.__version__}, default config {scan_triton.DEFAULT_CONFIG}")
    ok = check_reference("cuda")
    others = [] if args.no_torch else ["torch"]
    if "mamba" in available_backends("cuda"):
        others.append("mamba")

    for batch, length in shapes:
        inputs = ffm_inputs(batch, length)
        upstream = torch.randn(inputs["u"].shape, generator=torch.Generator(device="cuda").manual_seed(1),
                               device="cuda")
        print(f"\nbatch {batch}, 4x256 channels, N 16, L {length}:")
        results = {"triton": run(backend_fn("triton"), inputs, True, upstream)}
        for name in others:
            results[name] = run(backend_fn(name), inputs, True, upstream)
            print(f"  triton vs {name} (rtol {RTOL}, atol {ATOL}):")
            ok &= compare(results["triton"], results[name], RTOL, ATOL)
        del results
        for name in ["triton", *others]:
            t = timings(backend_fn(name), inputs, upstream, args.reps)
            print(f"  {name:>6}: forward {t['fwd_ms']:9.3f} ms   fwd+bwd {t['fwd_bwd_ms']:9.3f} ms   "
                  f"peak {t['peak_mib']:8.1f} MiB   first call {t['first_ms']:8.1f} ms")

    if args.sweep:
        print("\nconfig sweep (triton only; agreement with the default config checked at rtol 1e-5):")
        for batch, length in shapes:
            inputs = ffm_inputs(batch, length)
            upstream = torch.randn(inputs["u"].shape, device="cuda")
            ref = run(backend_fn("triton"), inputs, True, upstream)
            print(f" batch {batch}, L {length}:")
            for config in SWEEP:
                got = run(backend_fn("triton", config), inputs, True, upstream)
                same = all(torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-5) for k in ref)
                t = timings(backend_fn("triton", config), inputs, upstream, args.reps)
                ok &= same
                print(f"  block_d {config.block_d:2d} chunk {config.chunk:4d} warps {config.num_warps_fwd}/"
                      f"{config.num_warps_bwd}: forward {t['fwd_ms']:8.3f} ms  fwd+bwd {t['fwd_bwd_ms']:8.3f} ms  "
                      f"peak {t['peak_mib']:7.1f} MiB{'' if same else '  DIFFERS'}")
    print("\nall agreement checks passed" if ok else "\nAGREEMENT FAILURES (see FAIL above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
