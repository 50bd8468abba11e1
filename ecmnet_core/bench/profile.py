"""``bench profile``: where one inference path spends its time, per operator and per kind of work.

The path (default ``torch``, what the :class:`~ecmnet_core.inference.Segmenter` runs) is warmed up, then ``runs``
frames are recorded with the torch profiler (``record_shapes`` so that convolutions can be told apart by their
weight shape). Two tables come out, both in milliseconds of self CPU time per frame:

* per operator: the profiler's own names (``aten::mkldnn_convolution``, ``ecmnet::dw_pair_cpu``, ...);
* per kind of work: convolutions split into 1x1, depthwise and the others (3x3 dense, strided), the attention,
  the scan, activations, resampling and copies -- what the time goes to, against what the arithmetic needs.

Self times add up to slightly less than the wall time per frame (profiler overhead and time outside ops).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from ecmnet_core.bench.inference import PATHS, bench_checkpoint, build_path
from ecmnet_core.bench.timing import environment
from ecmnet_core.device import resolve_device


@dataclass
class ProfileConfig:
    path: str = "torch"
    sizes: tuple[tuple[int, int], ...] = ((360, 480),)
    checkpoint: str | None = None
    model: str | None = None  # random weights when no checkpoint is given
    classes: int = 11
    device: str = "cpu"
    runs: int = 10
    warmup: int = 3
    top: int = 25


def _conv_kind(shapes: list) -> str:
    """1x1, depthwise or other from a convolution's input shapes (input, weight, ...)."""
    if len(shapes) < 2 or len(shapes[1]) != 4:
        return "conv other"
    _, in_per_group, kh, kw = shapes[1]
    if kh == 1 and kw == 1:
        return "conv 1x1"
    if in_per_group == 1:
        return "conv depthwise"
    return "conv other"


def op_category(name: str, shapes: list) -> str:
    """The kind of work an operator does (the rows of the category table)."""
    low = name.lower()
    if low.startswith("ecmnet::"):
        if "attention" in low:
            return "attention"
        if "scan" in low:
            return "scan"
        return "EDAB kernels (depthwise pair, merge, shuffle, BN+PReLU)"
    if "conv" in low:  # aten::mkldnn_convolution, _slow_conv2d_forward, thnn_conv2d, ...
        return _conv_kind(shapes)
    if any(k in low for k in ("bmm", "matmul", "softmax", "baddbmm")):
        return "attention"
    if "prelu" in low or "relu" in low or "sigmoid" in low or "silu" in low:
        return "activation"
    if "upsample" in low or "interpolate" in low or "pool" in low:
        return "resample / pool"
    if any(k in low for k in ("copy", "contiguous", "clone", "to_dense", "permute", "cat", "empty")):
        return "copy / layout"
    if any(k in low for k in ("batch_norm", "add", "mul", "div", "sub", "mean", "sum")):
        return "elementwise / norm"
    return "other"


def profile_path(cfg: ProfileConfig) -> dict:
    """Profile ``cfg.path`` at every size; returns a JSON-ready dict of per-op and per-category tables."""
    if cfg.path not in PATHS:
        raise ValueError(f"--path: unknown path {cfg.path!r}; choose from {', '.join(PATHS)}")
    device = resolve_device(cfg.device)
    ckpt, ckpt_hash, source = bench_checkpoint(cfg.checkpoint, cfg.model, cfg.classes)
    results = {}
    for size in cfg.sizes:
        runner = build_path(cfg.path, ckpt, device, size, ckpt_hash)
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        for _ in range(cfg.warmup):
            runner.logits(x)
        start = time.perf_counter()
        for _ in range(cfg.runs):
            runner.logits(x)
        wall_ms = 1e3 * (time.perf_counter() - start) / cfg.runs
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(cfg.runs):
                runner.logits(x)
        ops: dict[str, dict] = defaultdict(lambda: {"self_ms": 0.0, "calls": 0})
        categories: dict[str, float] = defaultdict(float)
        for event in prof.key_averages(group_by_input_shape=True):
            self_ms = event.self_cpu_time_total / 1e3 / cfg.runs
            if self_ms <= 0:
                continue
            ops[event.key]["self_ms"] += self_ms
            ops[event.key]["calls"] += event.count // cfg.runs
            categories[op_category(event.key, list(event.input_shapes or []))] += self_ms
        total = sum(categories.values())
        results[f"{size[0]}x{size[1]}"] = {
            "wall_ms": wall_ms, "self_ms_total": total,
            "ops": sorted(({"op": k, **v} for k, v in ops.items()), key=lambda e: -e["self_ms"])[:cfg.top],
            "categories": sorted(({"category": k, "self_ms": v, "share": v / total} for k, v in categories.items()),
                                 key=lambda e: -e["self_ms"]),
        }
        del runner
    return {"mode": "profile", "path": cfg.path, "description": PATHS[cfg.path].description, "checkpoint": source,
            "runs": cfg.runs, "warmup": cfg.warmup, "results": results, "environment": environment(device)}


def format_profile(r: dict) -> str:
    env = r["environment"]
    lines = [f"profile of path '{r['path']}' ({r['description']}), {r['checkpoint']}",
             f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads; "
             f"{r['warmup']} warm-up + {r['runs']} profiled frames; ms are self CPU time per frame"]
    for size, res in r["results"].items():
        lines += ["", f"{size}: {res['wall_ms']:.1f} ms/frame unprofiled, {res['self_ms_total']:.1f} ms of op self "
                      "time profiled",
                  f"  {'kind of work':<56} {'ms':>7} {'share':>7}"]
        lines += [f"  {c['category']:<56} {c['self_ms']:>7.2f} {100 * c['share']:>6.1f}%" for c in res["categories"]]
        lines += [f"  {'operator':<56} {'ms':>7} {'calls':>7}"]
        lines += [f"  {o['op']:<56} {o['self_ms']:>7.2f} {o['calls']:>7}" for o in res["ops"]]
    return "\n".join(lines)
