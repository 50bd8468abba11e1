"""``bench``: latency of the whole model, or (``--scan``) of each selective-scan formulation on the FFM's shape.

Model mode times ``model(x)`` under ``torch.no_grad`` after warm-up and prints the median and p90 latency and
frames/s (batch / median). Random weights are used (timing does not depend on them), with BatchNorm statistics
calibrated on one random batch so activations stay in a realistic range (at the raw init they grow to ~1e8).

Scan mode builds the SS2D scan of the FFM for an image size: u/delta (B, 4*d_inner, L), B/C (B, 4, N, L),
L = ceil(H/16) * ceil(W/16), and measures, for every backend that runs on the device (``available_backends``)
plus the textbook formulation (``selective_scan_textbook``, which materialises (B, D, L, N)):

* forward time (no grad) and forward+backward time (all seven inputs require grad);
* peak extra memory of each: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the process's
  resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set before
  the call, with glibc's mmap threshold pinned at 1 MiB so that freed buffers leave the resident set. Memory is
  measured in a second pass after all timings, because pinning the threshold changes allocation speed.

The ``reference`` backend's forward+backward is autograd through the per-step loop. Speed-ups of the ``torch``
backend are printed as ratios (other time / torch time).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ecmnet_core.benchmarking import (
    MIB,
    cpu_peak_supported,
    disturbance_note,
    environment,
    peak_extra_bytes,
    time_fn,
)
from ecmnet_core.checkpoint import CheckpointError
from ecmnet_core.device import resolve_device
from ecmnet_core.model import VARIANTS, build_model
from ecmnet_core.ops.selective_scan import (
    BACKENDS,
    available_backends,
    resolve_backend,
    selective_scan_fn,
    selective_scan_textbook,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEXTBOOK = "textbook"
#: ``--skip-slow`` skips the per-step reference loop and the textbook forward+backward above this many steps.
SLOW_LENGTH = 2048
#: The FFM's scan: d_inner = 2 * 128, N = 16, 4 directions, at 1/16 of the image size.
FFM_D_INNER, FFM_D_STATE, FFM_DIRECTIONS, FFM_STRIDE = 256, 16, 4, 16


# ---------------------------------------------------------------------------------------------------------------
# model benchmark


@dataclass
class ModelBenchConfig:
    """``bench`` in model mode: what to build and how to time it (``dtype`` fp16/bf16 means autocast)."""

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


# ---------------------------------------------------------------------------------------------------------------
# scan benchmark


@dataclass
class ScanBenchConfig:
    """``bench --scan``: the image size that sets L, the methods (None: all runnable + textbook) and the limits."""

    size: tuple[int, int] = (360, 480)
    batch: int = 1
    device: str = "cpu"
    backends: list[str] | None = None
    runs: int = 5
    warmup: int = 1
    skip_slow: bool = False
    memory: bool = True
    budget_s: float = 60.0
    progress: bool = False  # one line per finished measurement on stderr (long runs)
    d_inner: int = FFM_D_INNER
    d_state: int = FFM_D_STATE
    directions: int = FFM_DIRECTIONS


def scan_length(size: tuple[int, int], stride: int = FFM_STRIDE) -> int:
    """Tokens of the FFM's scan for an image of ``size``: the 1/16 map, rounded up like the encoder."""
    return math.ceil(size[0] / stride) * math.ceil(size[1] / stride)


def scan_inputs(batch: int, length: int, d_inner: int = FFM_D_INNER, d_state: int = FFM_D_STATE,
                directions: int = FFM_DIRECTIONS, device: torch.device | str = "cpu",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """SS2D-like scan inputs: A = -[1..N] (S4D-real), D = 1, delta_bias = inverse softplus of dt in [1e-3, 0.1]."""
    gen = torch.Generator().manual_seed(seed)
    dim = directions * d_inner
    dt = torch.exp(torch.rand(dim, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    tensors = {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": 0.5 * torch.randn(batch, dim, length, generator=gen),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, directions, d_state, length, generator=gen),
        "C": torch.randn(batch, directions, d_state, length, generator=gen),
        "D": torch.ones(dim),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }
    return {k: v.to(device) for k, v in tensors.items()}


def _scan_call(method: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None, t["delta_bias"], True)
    if method == TEXTBOOK:
        return selective_scan_textbook(*args)
    return selective_scan_fn(*args, backend=method)


def _methods(cfg: ScanBenchConfig, device: torch.device) -> list[str]:
    runnable = available_backends(device)
    if not cfg.backends:
        return [*runnable, TEXTBOOK]
    methods = []
    for name in cfg.backends:
        name = name.strip().lower()
        if name == TEXTBOOK:
            methods.append(name)
            continue
        if name not in BACKENDS:
            raise ValueError(f"--backends: unknown backend {name!r}; choose from {', '.join([*BACKENDS, TEXTBOOK])}")
        if name not in runnable:
            resolve_backend(name, device)  # raises with the reason (no CUDA, not installed, ...)
            raise ValueError(f"--backends: backend {name!r} cannot run on {device}")
        methods.append(name)
    return list(dict.fromkeys(methods))


def _is_slow(method: str, mode: str, length: int) -> bool:
    """What ``--skip-slow`` leaves out: the per-step loop at any mode, the textbook's backward, past SLOW_LENGTH."""
    if length <= SLOW_LENGTH:
        return False
    return method == "reference" or (method == TEXTBOOK and mode == "fwd_bwd")


def bench_scan(cfg: ScanBenchConfig) -> dict:
    """Forward and forward+backward time and peak extra memory of each scan formulation; JSON-ready dict."""
    if cfg.batch < 1 or cfg.runs < 1 or cfg.warmup < 0:
        raise ValueError(f"--batch and --runs must be >= 1 and --warmup >= 0 (got {cfg.batch}, {cfg.runs}, "
                         f"{cfg.warmup})")
    device = resolve_device(cfg.device)
    methods = _methods(cfg, device)
    length = scan_length(cfg.size)
    base = scan_inputs(cfg.batch, length, cfg.d_inner, cfg.d_state, cfg.directions, device)
    grad_out = torch.randn(cfg.batch, cfg.directions * cfg.d_inner, length,
                           generator=torch.Generator().manual_seed(1)).to(device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in base.items()}

    def forward(method: str) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                _scan_call(method, base)
        return run

    def forward_backward(method: str) -> Callable[[], object]:
        def run() -> None:
            for v in leaves.values():
                v.grad = None
            _scan_call(method, leaves).backward(grad_out)
        return run

    modes = {"fwd": forward, "fwd_bwd": forward_backward}
    load_before = environment(device)["load_avg_1min"]
    results: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for method in methods:
        for mode, make in modes.items():
            if cfg.skip_slow and _is_slow(method, mode, length):
                results[method][mode] = {"skipped": f"--skip-slow (L = {length} > {SLOW_LENGTH})"}
                continue
            timing = time_fn(make(method), cfg.runs, cfg.warmup, device, cfg.budget_s)
            results[method][mode] = timing.summary()
            if cfg.progress:
                print(f"[bench --scan] {method} {mode}: median {timing.median:.1f} ms over {len(timing.samples_ms)} "
                      "run(s)", file=sys.stderr, flush=True)
    memory_note = None
    if cfg.memory:
        if device.type == "cpu" and not cpu_peak_supported():
            memory_note = "peak memory not measured: /proc/self/clear_refs is not writable here"
        else:
            for method in methods:
                for mode, make in modes.items():
                    res = results[method][mode]
                    if "skipped" in res:
                        continue
                    if res["median_ms"] > 1e3 * cfg.budget_s:
                        res["peak_extra_mib"] = None
                        res["memory_skipped"] = f"one call takes longer than --budget {cfg.budget_s:g} s"
                        continue
                    peak = peak_extra_bytes(make(method), device)
                    res["peak_extra_mib"] = None if peak is None else peak / MIB
                    if cfg.progress and peak is not None:
                        print(f"[bench --scan] {method} {mode}: peak extra {peak / MIB:.0f} MiB", file=sys.stderr,
                              flush=True)
            memory_note = ("CUDA max_memory_allocated above the inputs" if device.type == "cuda" else
                           "CPU resident-set high-water mark above the resident set before the call "
                           "(glibc mmap threshold pinned at 1 MiB)")
    default = resolve_backend(None, device)  # what SS2D uses here (environment variable, else automatic)
    env = environment(device)
    return {
        "mode": "scan", "input_size": list(cfg.size), "batch": cfg.batch, "length": length,
        "dim": cfg.directions * cfg.d_inner, "d_inner": cfg.d_inner, "d_state": cfg.d_state,
        "directions": cfg.directions, "input_mib": sum(v.numel() * v.element_size() for v in base.values()) / MIB,
        "results": results, "torch_speedup": _speedups(results, "torch"), "default_backend": default,
        "default_speedup": _speedups(results, default), "memory_method": memory_note, "environment": env,
        "note": disturbance_note(load_before, env["load_avg_1min"], env["threads"]),
    }


def _speedups(results: dict[str, dict[str, dict]], ours: str) -> dict[str, dict[str, float]]:
    """Other method's median time / ``ours``'s, per mode where both were measured."""
    out: dict[str, dict[str, float]] = {}
    if ours not in results:
        return out
    for method, res in results.items():
        if method == ours:
            continue
        for mode, theirs in res.items():
            mine = results[ours][mode]
            if "median_ms" in mine and "median_ms" in theirs:
                out.setdefault(method, {})[mode] = theirs["median_ms"] / mine["median_ms"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scan", action="store_true", help="time the selective-scan backends instead of the model")
    parser.add_argument("--train", action="store_true",
                        help="time training steps (baseline vs default path, in rounds) at --size and --batch, "
                             "and the data pipeline")
    parser.add_argument("--profile", nargs="?", const="torch", default=None, metavar="PATH",
                        help="per-operator and per-kind time of one inference path (default torch) at --sizes")
    parser.add_argument("--top", type=int, default=25, help="--profile: operators listed per size (default 25)")
    parser.add_argument("--points", type=int, default=None, metavar="N",
                        help="time point painting of N LiDAR points (projection + label lookup) instead; "
                             "--size is the label image size (default 720 1280)")
    parser.add_argument("--data", default=None,
                        help="--train: CamVid-style root for the data-loading figure (default ../shared/camvid)")
    parser.add_argument("--model", default="ecmnet", choices=list(VARIANTS), help="model variant (default ecmnet)")
    parser.add_argument("--classes", type=int, default=11, help="number of classes (default 11, CamVid)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="image height and width (default 360 480); --scan uses L = ceil(H/16)*ceil(W/16)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="model mode: fp32, or autocast to fp16/bf16 (the scan always runs in fp32)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default 20; --scan: 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default 3; --scan: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="model mode: channels-last memory format")
    parser.add_argument("--scan-backend", default=None,
                        help=f"model mode: selective-scan backend ({', '.join(BACKENDS)}; default automatic)")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help=f"--scan: formulations to time (from {', '.join([*BACKENDS, TEXTBOOK])}; "
                             "default: every backend that runs on the device, plus textbook)")
    parser.add_argument("--skip-slow", action="store_true",
                        help=f"--scan: skip the per-step reference loop and the textbook backward when "
                             f"L > {SLOW_LENGTH}")
    parser.add_argument("--no-memory", action="store_true", help="--scan: do not measure peak memory")
    parser.add_argument("--trainer-allocator", action="store_true",
                        help="--train: both paths under the allocator policy of ecmnet-core train (freed memory kept "
                             "for reuse) instead of glibc's defaults")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="--scan, --paths: stop repeating one measurement after this many seconds (default 60)")
    parser.add_argument("--progress", action="store_true",
                        help="--scan, --paths: report each finished measurement on stderr while the run goes on")
    parser.add_argument("--paths", nargs="*", default=None, metavar="PATH",
                        help="compare inference paths (eager, eager-kernels, torch, torch-compile, onnxruntime, "
                             "torch-fp16, torch-bf16, torch-fp16-graphs) against eager fp32 at --sizes; no names = "
                             "the device's defaults")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="HxW",
                        help="--paths, --profile: input sizes (--paths default 360x480 512x1024 1024x2048; "
                             "--profile default --size)")
    parser.add_argument("--checkpoint", default=None,
                        help="--paths: checkpoint to run (default the packaged CamVid model; --random for untrained)")
    parser.add_argument("--random", action="store_true", help="--paths: random weights of --model instead")
    parser.add_argument("--agreement", default=None, metavar="DIR",
                        help="--paths: also compare every path's arg-max labels with the baseline's on these images")
    parser.add_argument("--agreement-limit", type=int, default=None, help="--paths: use only the first N images")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _fmt_ms(r: dict) -> str:
    if "skipped" in r:
        return f"{'skipped':>10}"
    return f"{r['median_ms']:>9.1f}{'+' if r.get('cold') else ' '}"


def _fmt_mib(r: dict) -> str:
    v = r.get("peak_extra_mib")
    return f"{'-':>9}" if v is None else f"{v:>9.0f}"


def _format_model(r: dict) -> str:
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


def _format_scan(r: dict) -> str:
    env = r["environment"]
    h, w = r["input_size"]
    lines = [
        f"selective scan, FFM shape for {h}x{w}: batch {r['batch']}, L {r['length']}, D {r['dim']} "
        f"({r['directions']} x d_inner {r['d_inner']}), N {r['d_state']}; inputs {r['input_mib']:.0f} MiB",
        f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads",
        f"{'method':<12} {'fwd ms':>10} {'runs':>4} {'fwd MiB':>9} {'fwd+bwd ms':>10} {'runs':>4} {'f+b MiB':>9}",
    ]
    labels = {"reference": "reference*", TEXTBOOK: "textbook"}
    for method, res in r["results"].items():
        f, fb = res["fwd"], res["fwd_bwd"]
        lines.append(f"{labels.get(method, method):<12} {_fmt_ms(f)} {f.get('runs', 0):>4} {_fmt_mib(f)} "
                     f"{_fmt_ms(fb)} {fb.get('runs', 0):>4} {_fmt_mib(fb)}")
    lines.append("  * reference forward+backward = autograd through the per-step loop; textbook materialises "
                 "(B, D, L, N); times are medians")
    if any(res[m].get("cold") for res in r["results"].values() for m in res):
        lines.append("  + a single call (its warm-up alone exceeded --budget); memory of such calls is not measured")
    for ours, key in (("torch", "torch_speedup"), (r["default_backend"], "default_speedup")):
        if key == "default_speedup" and ours == "torch":
            continue
        label = f"{ours} (default)" if ours == r["default_backend"] else ours
        for method, ratios in r[key].items():
            parts = [f"{'fwd' if k == 'fwd' else 'fwd+bwd'} {v:.2f}x" for k, v in ratios.items()]
            lines.append(f"{label} speed-up vs {method}: " + ", ".join(parts))
    if r["memory_method"]:
        lines.append(f"peak extra memory: {r['memory_method']}")
    if r["note"]:
        lines.append(f"WARNING: {r['note']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"bench: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    size = (int(args.size[0]), int(args.size[1])) if args.size else (360, 480)
    try:
        if args.points is not None:
            from ecmnet_core.points.bench import bench_painting, format_painting

            result = bench_painting(args.points, size if args.size else (720, 1280),
                                    runs=50 if args.runs is None else args.runs,
                                    warmup=5 if args.warmup is None else args.warmup)
            text = format_painting
        elif args.profile is not None:
            from ecmnet_core.bench_paths import parse_size
            from ecmnet_core.bench_profile import ProfileConfig, format_profile, profile_path

            sizes = tuple(parse_size(v) for v in args.sizes) if args.sizes else (size,)
            result = profile_path(ProfileConfig(path=args.profile, sizes=sizes, checkpoint=args.checkpoint,
                                                model=args.model if args.random else None, classes=args.classes,
                                                device=args.device, runs=10 if args.runs is None else args.runs,
                                                warmup=3 if args.warmup is None else args.warmup, top=args.top))
            text = format_profile
        elif args.train:
            from ecmnet_core.bench_train import TrainBenchConfig, bench_train, format_train

            if args.batch < 1:
                raise ValueError(f"--batch must be >= 1, got {args.batch}")
            tcfg = TrainBenchConfig(size=size, batch=args.batch, classes=args.classes, model=args.model,
                                    runs=5 if args.runs is None else args.runs,
                                    warmup=1 if args.warmup is None else args.warmup,
                                    budget_s=max(args.budget, 120.0), data=args.data,
                                    trainer_allocator=args.trainer_allocator)
            result = bench_train(tcfg)
            text = format_train
        elif args.paths is not None:
            from ecmnet_core.bench_paths import PathsBenchConfig, bench_paths, format_paths, parse_size

            sizes = tuple(parse_size(v) for v in args.sizes) if args.sizes else None
            pcfg = PathsBenchConfig(checkpoint=args.checkpoint, model=args.model if args.random else None,
                                    classes=args.classes, device=args.device, paths=tuple(args.paths) or None,
                                    runs=10 if args.runs is None else args.runs,
                                    warmup=2 if args.warmup is None else args.warmup, budget_s=args.budget,
                                    agreement=args.agreement, agreement_limit=args.agreement_limit,
                                    progress=(lambda m: print(m, file=sys.stderr, flush=True)) if args.progress
                                    else None)
            if sizes:
                pcfg.sizes = sizes
            result = bench_paths(pcfg)
            text = format_paths
        elif args.scan:
            cfg = ScanBenchConfig(size=size, batch=args.batch, device=args.device, backends=args.backends,
                                  runs=5 if args.runs is None else args.runs,
                                  warmup=1 if args.warmup is None else args.warmup, skip_slow=args.skip_slow,
                                  memory=not args.no_memory, budget_s=args.budget, progress=args.progress)
            result = bench_scan(cfg)
            text = _format_scan
        else:
            if args.scan_backend is not None:
                resolve_backend(args.scan_backend, resolve_device(args.device))
            cfg = ModelBenchConfig(model=args.model, classes=args.classes, size=size, batch=args.batch,
                                   device=args.device, dtype=args.dtype, runs=20 if args.runs is None else args.runs,
                                   warmup=3 if args.warmup is None else args.warmup,
                                   channels_last=args.channels_last, scan_backend=args.scan_backend)
            result = bench_model(cfg)
            text = _format_model
    except (ValueError, CheckpointError) as exc:
        raise SystemExit(f"bench: {exc}") from exc
    print(json.dumps(result) if args.json else text(result))
    return 0
