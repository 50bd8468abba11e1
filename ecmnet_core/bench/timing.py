"""What every benchmark shares: interleaved timing in rounds, the one latency summary, peak memory, the environment
record and the warning for a busy machine. Every ``bench`` mode, replay's report and the node's benches use it."""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ecmnet_core.allocator import MIB, malloc_trim, pin_mmap_threshold

__all__ = ["MIB", "Timing", "cpu_peak_supported", "disturbance_note", "environment", "peak_extra_bytes",
           "latency_summary", "percentile", "time_fn", "time_interleaved"]

# ---------------------------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Wall-clock samples of one measurement, in milliseconds."""

    samples_ms: list[float]
    cold: bool = False  # the only sample is a warm-up call that alone exceeded the time budget

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p90(self) -> float:
        return percentile(self.samples_ms, 90)

    def summary(self) -> dict[str, float | int]:
        s = self.samples_ms
        out = {"median_ms": self.median, "p90_ms": self.p90, "mean_ms": statistics.fmean(s), "min_ms": min(s),
               "max_ms": max(s), "runs": len(s)}
        if self.cold:
            out["cold"] = True
        return out


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile (numpy's default method) of a non-empty list."""
    if not values:
        raise ValueError("percentile of an empty list")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(values_ms: Iterable[float | None]) -> dict[str, float | int | None]:
    """count, mean, min, p50, p90, p95, p99 and max of latencies in milliseconds (non-finite and None values
    dropped; None statistics when nothing is left): the one summary the benchmarks, replay and the demo report."""
    xs = [float(v) for v in values_ms if v is not None and math.isfinite(v)]
    if not xs:
        return {"count": 0, **dict.fromkeys(("mean", "min", "p50", "p90", "p95", "p99", "max"))}
    return {"count": len(xs), "mean": statistics.fmean(xs), "min": min(xs),
            **{f"p{q}": percentile(xs, q) for q in (50, 90, 95, 99)}, "max": max(xs)}


def time_fn(fn: Callable[[], object], runs: int, warmup: int, device: torch.device,
            budget_s: float | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times, then time up to ``runs`` calls (at least one; stop early past ``budget_s``).

    A warm-up call that alone takes longer than ``budget_s`` becomes the only sample (``cold``): repeating a
    minutes-long call adds little information. (:func:`time_interleaved` with one function.)
    """
    return time_interleaved({"fn": fn}, runs, warmup, device, budget_s)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int, device: torch.device,
                     budget_s: float | None = None) -> dict[str, Timing]:
    """Time several functions in rounds (one call of each per round) so they share the machine's conditions.

    On a shared machine the speed drifts over seconds; timing A's runs and then B's turns that drift into a bias of
    the ratio A/B, while alternating spreads it over both. Each function is called ``warmup`` times first; a
    warm-up call longer than ``budget_s`` becomes that function's only (``cold``) sample: repeating a minutes-long
    call adds little information. A function leaves the rounds once its timed calls add up to more than
    ``budget_s``; every function gets at least one timed call.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    out: dict[str, Timing] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            elapsed = timed(fn)
            if budget_s is not None and elapsed > budget_s * 1e3:
                out[name] = Timing([elapsed], cold=True)
                break
    active = [name for name in fns if name not in out]
    samples: dict[str, list[float]] = {name: [] for name in active}
    for _ in range(max(runs, 1)):
        for name in list(active):
            samples[name].append(timed(fns[name]))
            if budget_s is not None and sum(samples[name]) > budget_s * 1e3:
                active.remove(name)
        if not active:
            break
    out.update({name: Timing(s) for name, s in samples.items()})
    return {name: out[name] for name in fns}


# ---------------------------------------------------------------------------------------------------------------
# peak memory


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_supported() -> bool:
    """True where the resident-set high-water mark can be reset (Linux with a writable /proc/self/clear_refs)."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory ``fn`` needs above what is allocated before it runs (None where it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not (cpu_peak_supported() and pin_mmap_threshold()):
        return None
    malloc_trim()
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    fn()
    return max(_proc_status_kib("VmHWM") - base, 0) * 1024


# ---------------------------------------------------------------------------------------------------------------
# environment


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = _cpu_name()
    return env


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def disturbance_note(load_before: float | None, load_after: float | None, threads: int) -> str | None:
    """A warning when other processes were competing for the CPUs (1-minute load average above our threads)."""
    cpus = os.cpu_count() or 1
    worst = max(v for v in (load_before, load_after, 0.0) if v is not None)
    if worst > max(threads, 1) + 0.5 and worst > 0.75 * cpus:
        return (f"load average reached {worst:.1f} on {cpus} CPUs (this run uses {threads} threads): other "
                "processes were competing, timings are likely inflated")
    return None
