"""``bench model``: latency of the whole model's forward pass at one input size.

Times ``model(x)`` under ``torch.no_grad`` after warm-up and prints the median and p90 latency and frames/s
(batch / median). Random weights are used (timing does not depend on them), with BatchNorm statistics calibrated
on one random batch so activations stay in a realistic range (at the raw init they grow to ~1e8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecmnet_core.bench.timing import disturbance_note, environment, time_fn
from ecmnet_core.device import resolve_device
from ecmnet_core.model import build_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelBenchConfig:
    """``bench model``: what to build and how to time it (``dtype`` fp16/bf16 means autocast)."""

    model: str = "ecmnet"
    classes: int = 11
    size: tuple[int, int] = (360, 480)
    batch: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    runs: int = 20
    warmup: int = 3
    channels_last: bool = False
    scan_backend: str | None = None


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set BN running statistics from one random batch (cumulative average), then return to eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def bench_model(cfg: ModelBenchConfig) -> dict:
    """Latency of one forward pass of a (random-weight) model; returns a JSON-ready dict."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    if cfg.batch < 1 or cfg.runs < 1 or cfg.warmup < 0:
        raise ValueError(f"--batch and --runs must be >= 1 and --warmup >= 0 (got {cfg.batch}, {cfg.runs}, "
                         f"{cfg.warmup})")
    h, w = cfg.size
    if min(h, w) < 16:
        raise ValueError(f"--size {h} {w}: both sides must be >= 16 (the network's total stride)")
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    model = build_model(cfg.model, cfg.classes, scan_backend=cfg.scan_backend).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, 3, h, w, generator=gen).to(device).contiguous(memory_format=memory_format)
    _calibrate_batchnorm(model, x)
    autocast = dtype != torch.float32

    def step() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return model(x)

    load_before = environment(device)["load_avg_1min"]
    timing = time_fn(step, cfg.runs, cfg.warmup, device)
    env = environment(device)
    result = {
        "mode": "model", "model": cfg.model, "classes": cfg.classes, "input_size": [h, w], "batch": cfg.batch,
        "dtype": cfg.dtype, "channels_last": cfg.channels_last, "scan_backend": model.scan_backend(device),
        "warmup": cfg.warmup, **timing.summary(), "fps": cfg.batch * 1e3 / timing.median,
        "environment": env, "note": disturbance_note(load_before, env["load_avg_1min"], env["threads"]),
    }
    return result


def format_model(r: dict) -> str:
    env = r["environment"]
    h, w = r["input_size"]
    lines = [
        f"model {r['model']!r} ({r['classes']} classes), input {r['batch']}x3x{h}x{w}, {r['dtype']}"
        f"{', channels-last' if r['channels_last'] else ''}, scan backend {r['scan_backend']}",
        f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads",
        f"latency over {r['runs']} runs after {r['warmup']} warm-up: median {r['median_ms']:.1f} ms, "
        f"p90 {r['p90_ms']:.1f} ms (min {r['min_ms']:.1f}, max {r['max_ms']:.1f})",
        f"throughput {r['fps']:.2f} frames/s (batch / median)",
    ]
    if r["note"]:
        lines.append(f"WARNING: {r['note']}")
    return "\n".join(lines)


__all__ = ["DTYPES", "ModelBenchConfig", "bench_model", "format_model"]
