"""``bench``: latency statistics, the model benchmark, the scan benchmark (every backend plus the textbook
formulation, forward and forward+backward, peak extra memory, speed-up ratios) and their command line, on tiny
shapes. The acceptance figures themselves come from the benchmark commands, not from tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ecmnet_core.bench import scan as bench_scan_module
from ecmnet_core.bench import timing as benchmarking
from ecmnet_core.bench.model import ModelBenchConfig, bench_model
from ecmnet_core.bench.scan import TEXTBOOK, ScanBenchConfig, bench_scan, scan_inputs, scan_length
from ecmnet_core.bench.timing import cpu_peak_supported, peak_extra_bytes, percentile
from ecmnet_core.cli import main
from ecmnet_core.device import resolve_device
from ecmnet_core.ops.selective_scan import available_backends, selective_scan_fn, selective_scan_textbook

# one intra-op thread (conftest): on the shared 2-core machine OpenMP spinning makes 2 threads much slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_percentile_matches_numpy() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_time_fn_runs_and_budget() -> None:
    calls = []
    timing = benchmarking.time_fn(lambda: calls.append(1), runs=5, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 7 and len(timing.samples_ms) == 5 and not timing.cold
    # a warm-up call longer than the budget is the only sample; timed runs stop once the budget is spent
    calls.clear()
    timing = benchmarking.time_fn(lambda: calls.append(1), runs=5, warmup=1, device=torch.device("cpu"), budget_s=0.0)
    assert len(calls) == 1 and timing.cold and timing.summary()["cold"] and timing.summary()["runs"] == 1
    calls.clear()
    timing = benchmarking.time_fn(lambda: calls.append(1), runs=5, warmup=0, device=torch.device("cpu"), budget_s=0.0)
    assert len(calls) == 1 and not timing.cold



def test_time_interleaved_alternates_and_keeps_budgets_per_function(monkeypatch) -> None:
    """Timed calls alternate a, b, a, b, ... (so drift hits both); a slow function leaves the rounds on its own
    budget while the fast one keeps going; a cold warm-up is that function's only sample. A fake clock: each
    function advances it by its cost, so the budgets do not depend on this machine's load."""
    clock = [0.0]
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])  # the timing toolkit's clock
    calls: list[str] = []

    def fn(name: str, cost_s: float):
        return lambda: (calls.append(name), clock.__setitem__(0, clock[0] + cost_s))

    cpu = torch.device("cpu")
    out = benchmarking.time_interleaved({"a": fn("a", 0.001), "b": fn("b", 0.002)}, runs=4, warmup=1, device=cpu)
    assert calls == ["a", "b"] + ["a", "b"] * 4 and list(out) == ["a", "b"]
    assert all(len(t.samples_ms) == 4 and not t.cold for t in out.values())
    assert out["a"].median == pytest.approx(1.0) and out["b"].median == pytest.approx(2.0)

    calls.clear()
    out = benchmarking.time_interleaved({"slow": fn("slow", 0.03), "fast": fn("fast", 0.001)}, runs=5, warmup=0,
                                 device=cpu, budget_s=0.05)
    assert len(out["slow"].samples_ms) == 2 and len(out["fast"].samples_ms) == 5
    assert calls == ["slow", "fast", "slow", "fast", "fast", "fast", "fast"]

    calls.clear()
    out = benchmarking.time_interleaved({"cold": fn("cold", 0.02), "warm": fn("warm", 0.001)}, runs=3, warmup=2,
                                 device=cpu, budget_s=0.01)
    assert out["cold"].cold and out["cold"].samples_ms == [pytest.approx(20.0)] and calls.count("cold") == 1
    assert not out["warm"].cold and len(out["warm"].samples_ms) == 3


def test_scan_length_is_the_ffm_grid() -> None:
    assert scan_length((1024, 2048)) == 8192
    assert scan_length((360, 480)) == 23 * 30 == 690
    assert scan_length((512, 1024)) == 2048


def test_scan_inputs_have_the_ffm_layout() -> None:
    t = scan_inputs(2, 30)
    assert t["u"].shape == t["delta"].shape == (2, 1024, 30)
    assert t["B"].shape == t["C"].shape == (2, 4, 16, 30)
    assert t["A"].shape == (1024, 16) and (t["A"] < 0).all()
    dt = torch.nn.functional.softplus(t["delta_bias"])  # the SS2D dt init range
    assert dt.min() >= 1e-3 * 0.99 and dt.max() <= 0.1 * 1.01


def test_textbook_agrees_with_backends() -> None:
    """The baseline formulation computes the same scan as the backends it is compared with."""
    t = scan_inputs(1, 40, d_inner=8, d_state=4)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None, t["delta_bias"], True)
    expected = selective_scan_fn(*args, backend="reference")
    torch.testing.assert_close(selective_scan_textbook(*args), expected, rtol=1e-4, atol=1e-5)
    for backend in available_backends("cpu"):
        torch.testing.assert_close(selective_scan_fn(*args, backend=backend), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux with a writable /proc/self/clear_refs")
def test_peak_extra_memory_sees_a_temporary_buffer() -> None:
    """A 64 MiB buffer that is written and freed inside the call is reported (RSS high-water mark)."""
    def work() -> None:
        buf = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
        assert buf.sum() > 0

    peak = peak_extra_bytes(work, torch.device("cpu"))
    assert peak is not None and 60 * 2**20 <= peak < 200 * 2**20
    assert peak_extra_bytes(lambda: None, torch.device("cpu")) < 16 * 2**20


def test_bench_model_tiny() -> None:
    r = bench_model(ModelBenchConfig(model="baseline", classes=3, size=(32, 48), batch=2, runs=4, warmup=1))
    assert r["runs"] == 4 and r["batch"] == 2
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
    assert r["fps"] == pytest.approx(2 * 1000 / r["median_ms"])
    assert r["scan_backend"] is None  # the baseline has no FFM
    assert r["environment"]["threads"] == 1


def test_bench_model_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="--dtype"):
        bench_model(ModelBenchConfig(dtype="fp64"))
    with pytest.raises(ValueError, match="--size 8 48"):
        bench_model(ModelBenchConfig(size=(8, 48)))
    with pytest.raises(ValueError, match="only cpu, cuda"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bench_scan_tiny_all_methods() -> None:
    """Every runnable backend plus textbook, forward and forward+backward, with memory and speed-up ratios."""
    r = bench_scan(ScanBenchConfig(size=(64, 64), batch=1, runs=2, warmup=0, d_inner=16))
    methods = [*available_backends("cpu"), TEXTBOOK]
    assert list(r["results"]) == methods
    assert r["length"] == 16 and r["dim"] == 64
    for method in methods:
        for mode in ("fwd", "fwd_bwd"):
            res = r["results"][method][mode]
            assert res["runs"] == 2 and res["median_ms"] > 0, (method, mode)
            if cpu_peak_supported():
                assert res["peak_extra_mib"] is not None and res["peak_extra_mib"] >= 0
    for method in methods:
        if method != "torch":
            ratios = r["torch_speedup"][method]
            assert ratios["fwd"] == pytest.approx(
                r["results"][method]["fwd"]["median_ms"] / r["results"]["torch"]["fwd"]["median_ms"])


def test_bench_scan_skip_slow_and_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_scan_module, "SLOW_LENGTH", 8)  # make L = 16 "huge"
    r = bench_scan(ScanBenchConfig(size=(64, 64), runs=1, warmup=0, d_inner=8, backends=["torch", "reference",
                                                                                       "textbook"],
                                   skip_slow=True, memory=False))
    assert "skipped" in r["results"]["reference"]["fwd"] and "skipped" in r["results"]["reference"]["fwd_bwd"]
    assert "median_ms" in r["results"][TEXTBOOK]["fwd"] and "skipped" in r["results"][TEXTBOOK]["fwd_bwd"]
    assert "median_ms" in r["results"]["torch"]["fwd_bwd"]
    assert "reference" not in r["torch_speedup"]
    with pytest.raises(ValueError, match="unknown backend 'warp'"):
        bench_scan(ScanBenchConfig(size=(64, 64), backends=["warp"]))


def test_cli_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "model", "--model", "baseline", "--classes", "3", "--size", "32", "48", "--runs", "3",
                 "--warmup", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "model" and out["runs"] == 3 and {"median_ms", "p90_ms", "fps"} <= set(out)


def test_cli_bench_scan_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scan", "--size", "32", "32", "--runs", "1", "--warmup", "0",
                 "--backends", "torch", "textbook", "--no-memory"]) == 0
    text = capsys.readouterr().out
    assert "L 4" in text and "torch speed-up vs textbook" in text


def test_cli_bench_bad_input() -> None:
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        main(["bench", "model", "--threads", "0"])
    with pytest.raises(SystemExit, match="unknown selective-scan backend"):
        main(["bench", "model", "--scan-backend", "nope", "--size", "32", "32"])


def test_cli_bench_old_flags_still_work_and_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    """The single-command spellings of the last release map onto the modes, with a deprecation line."""
    assert main(["bench", "--scan", "--size", "32", "32", "--runs", "1", "--warmup", "0",
                 "--backends", "torch", "--no-memory", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["mode"] == "scan"
    assert "deprecated; use 'ecmnet-core bench scan ...'" in captured.err
    assert main(["bench", "--model", "baseline", "--classes", "3", "--size", "32", "48", "--runs", "1",
                 "--warmup", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "model"


def test_cli_bench_modes_have_their_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "scan", "--help"])
    text = capsys.readouterr().out
    assert "--backends" in text and "--dtype" not in text and "--paths" not in text
