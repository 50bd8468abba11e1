"""``ecmnet-core bench MODE``: one sub-command per benchmark, each with its own ``--help``.

    ecmnet-core bench model      --size 360 480 --threads 2        # forward latency of a (random-weight) model
    ecmnet-core bench scan       --size 512 1024                   # every selective-scan backend on the FFM shape
    ecmnet-core bench inference  --sizes 360x480 --threads 2       # every inference path against eager fp32
    ecmnet-core bench profile    --sizes 360x480                   # per-operator time of one inference path
    ecmnet-core bench train      --size 360 480 --batch 8          # training step, baseline vs default path
    ecmnet-core bench points     --points 100000                   # point painting
    ecmnet-core bench baseline   --rev 2822c60 --threads 2         # this tree against an earlier revision

The flags of the single ``bench`` command of earlier releases (``--scan``, ``--paths``, ``--profile``, ``--train``,
``--points``, none for the model) still work for one release: :func:`legacy_argv` rewrites them and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

#: mode -> one-line help
MODES = {
    "model": "forward latency of a (random-weight) model at one input size",
    "scan": "forward and forward+backward time and memory of every selective-scan backend on the FFM shape",
    "inference": "every inference path (eager, kernels, torch.export graph, ONNX Runtime, fp16 ...) against eager fp32",
    "profile": "per-operator and per-kind time of one inference path",
    "train": "seconds per training step, baseline vs default path, and the data pipeline's images/s",
    "points": "point painting of N LiDAR points (projection + label lookup)",
    "baseline": "this tree's Segmenter against an earlier git revision's, end to end and forward, in one process",
}
#: old flag -> mode (the flag's value, if any, becomes that mode's option)
LEGACY = {"--scan": "scan", "--paths": "inference", "--profile": "profile", "--train": "train", "--points": "points"}


def legacy_argv(argv: list[str]) -> list[str]:
    """``bench --scan ...`` -> ``bench scan ...`` and the like (deprecated spellings, kept for one release)."""
    i = argv.index("bench") if "bench" in argv else -1
    rest = argv[i + 1:]
    if i < 0 or (rest and rest[0] in (*MODES, "-h", "--help")):
        return argv
    mode, out, j = "model", [], 0
    while j < len(rest):
        arg = rest[j]
        if arg in LEGACY:
            mode = LEGACY[arg]
            values = []
            while j + 1 < len(rest) and not rest[j + 1].startswith("-"):
                values.append(rest[j + 1])
                j += 1
            if arg == "--paths" and values:
                out += ["--paths", *values]
            elif arg == "--profile" and values:
                out += ["--path", values[0]]
            elif arg == "--points":
                out += ["--points", *values]
        else:
            out.append(arg)
        j += 1
    old = " ".join(rest)
    print(f"bench: '{'bench ' + old if old else 'bench'}' is deprecated; use 'ecmnet-core bench {mode} ...' "
          "(see 'ecmnet-core bench --help')", file=sys.stderr)
    return [*argv[: i + 1], mode, *out]


# ------------------------------------------------------------------------------------------------ options
def _common(p: argparse.ArgumentParser, runs: int, warmup: int, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--runs", type=int, default=runs, help=f"timed runs (default {runs})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up runs (default {warmup})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _size(p: argparse.ArgumentParser, default: tuple[int, int], extra: str = "") -> None:
    p.add_argument("--size", type=int, nargs=2, default=list(default), metavar=("H", "W"),
                   help=f"image height and width (default {default[0]} {default[1]}){extra}")


def _model_choice(p: argparse.ArgumentParser) -> None:
    from ecmnet_core.model import VARIANTS

    p.add_argument("--model", default="ecmnet", choices=list(VARIANTS), help="model variant (default ecmnet)")
    p.add_argument("--classes", type=int, default=11, help="number of classes (default 11, CamVid)")


def _checkpoint_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint to run (default the packaged CamVid model; --random for untrained weights)")
    p.add_argument("--random", action="store_true", help="random weights of --model instead of a checkpoint")


def _add_model(p: argparse.ArgumentParser) -> None:
    from ecmnet_core.bench.model import DTYPES
    from ecmnet_core.ops.selective_scan import BACKENDS

    _model_choice(p)
    _size(p, (360, 480))
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="fp32, or autocast to fp16/bf16 (the scan always runs in fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--scan-backend", default=None,
                   help=f"selective-scan backend ({', '.join(BACKENDS)}; default automatic)")
    _common(p, runs=20, warmup=3)


def _add_scan(p: argparse.ArgumentParser) -> None:
    from ecmnet_core.bench.scan import BACKENDS, SLOW_LENGTH, TEXTBOOK

    _size(p, (360, 480), "; the scan runs L = ceil(H/16)*ceil(W/16) steps")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help=f"formulations to time (from {', '.join([*BACKENDS, TEXTBOOK])}; default: every backend "
                        "that runs on the device, plus textbook)")
    p.add_argument("--skip-slow", action="store_true",
                   help=f"skip the per-step reference loop and the textbook backward when L > {SLOW_LENGTH}")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--budget", type=float, default=60.0,
                   help="stop repeating one measurement after this many seconds (default 60)")
    p.add_argument("--progress", action="store_true", help="report each finished measurement on stderr")
    _common(p, runs=5, warmup=1)


def _add_inference(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paths", nargs="*", default=None, metavar="PATH",
                   help="inference paths to compare with eager fp32 (eager, eager-kernels, torch, torch-compile, "
                        "onnxruntime, torch-fp16, torch-bf16, torch-fp16-graphs; default: the device's defaults)")
    p.add_argument("--sizes", nargs="+", default=None, metavar="HxW",
                   help="input sizes (default 360x480 512x1024 1024x2048)")
    _checkpoint_choice(p)
    _model_choice(p)
    p.add_argument("--agreement", default=None, metavar="DIR",
                   help="also compare every path's arg-max labels with the baseline's on these images")
    p.add_argument("--agreement-limit", type=int, default=None, help="use only the first N images of --agreement")
    p.add_argument("--miou", default=None, metavar="DATA",
                   help="also score every path's mIoU on this labelled dataset's --miou-split, at the first size")
    p.add_argument("--miou-split", default="val", help="split of --miou (default val)")
    p.add_argument("--miou-limit", type=int, default=None, help="use only the first N samples of --miou")
    p.add_argument("--budget", type=float, default=60.0,
                   help="stop repeating one measurement after this many seconds (default 60)")
    p.add_argument("--progress", action="store_true", help="report each finished measurement on stderr")
    _common(p, runs=10, warmup=2)


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", default="torch", help="inference path to profile (default torch, the default path)")
    p.add_argument("--sizes", nargs="+", default=["360x480"], metavar="HxW", help="input sizes (default 360x480)")
    p.add_argument("--top", type=int, default=25, help="operators listed per size (default 25)")
    _checkpoint_choice(p)
    _model_choice(p)
    _common(p, runs=10, warmup=3)


def _add_train(p: argparse.ArgumentParser) -> None:
    from ecmnet_core.bench.training import DATA_ENV

    _model_choice(p)
    _size(p, (360, 480))
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--data", default=None,
                   help=f"CamVid-style root for the data-loading figure (default ${DATA_ENV}; none: skipped)")
    p.add_argument("--trainer-allocator", action="store_true",
                   help="both paths under the allocator policy of ecmnet-core train (freed memory kept for reuse) "
                        "instead of glibc's defaults")
    p.add_argument("--budget", type=float, default=120.0,
                   help="stop repeating one measurement after this many seconds (default and minimum 120)")
    _common(p, runs=5, warmup=1, device=False)


def _add_points(p: argparse.ArgumentParser) -> None:
    p.add_argument("--points", type=int, default=100_000, metavar="N", help="LiDAR points (default 100000)")
    _size(p, (720, 1280), " of the label image")
    _common(p, runs=50, warmup=5, device=False)


def _add_baseline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rev", default="2822c60", help="git revision to compare with (default 2822c60)")
    p.add_argument("--sizes", nargs="+", default=["352x480"], metavar="HxW", help="input sizes (default 352x480)")
    p.add_argument("--image-size", default=None, metavar="HxW",
                   help="camera image size, resized to each network input size (default: the input size itself)")
    p.add_argument("--checkpoint", default=None, help="checkpoint both load (default: the packaged CamVid model)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="this tree's inference dtype (default fp32; the revision runs its own default)")
    p.add_argument("--budget", type=float, default=120.0,
                   help="stop repeating one measurement after this many seconds (default 120)")
    _common(p, runs=20, warmup=3, device=False)


ADDERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "model": _add_model, "scan": _add_scan, "inference": _add_inference, "profile": _add_profile,
    "train": _add_train, "points": _add_points, "baseline": _add_baseline,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].strip().strip("`").replace("``", "")
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    for mode, help_text in MODES.items():
        ADDERS[mode](sub.add_parser(mode, help=help_text, description=help_text))


# ------------------------------------------------------------------------------------------------ running
def _sizes(values: list[str] | None) -> tuple[tuple[int, int], ...] | None:
    from ecmnet_core.bench.inference import parse_size

    return tuple(parse_size(v) for v in values) if values else None


def _run_mode(args: argparse.Namespace) -> tuple[dict, Callable[[dict], str]]:
    size = (int(args.size[0]), int(args.size[1])) if getattr(args, "size", None) else None
    if args.mode == "model":
        from ecmnet_core.bench.model import ModelBenchConfig, bench_model, format_model
        from ecmnet_core.device import resolve_device
        from ecmnet_core.ops.selective_scan import resolve_backend

        if args.scan_backend is not None:
            resolve_backend(args.scan_backend, resolve_device(args.device))
        return bench_model(ModelBenchConfig(
            model=args.model, classes=args.classes, size=size, batch=args.batch, device=args.device,
            dtype=args.dtype, runs=args.runs, warmup=args.warmup, channels_last=args.channels_last,
            scan_backend=args.scan_backend)), format_model
    if args.mode == "scan":
        from ecmnet_core.bench.scan import ScanBenchConfig, bench_scan, format_scan

        return bench_scan(ScanBenchConfig(
            size=size, batch=args.batch, device=args.device, backends=args.backends, runs=args.runs,
            warmup=args.warmup, skip_slow=args.skip_slow, memory=not args.no_memory, budget_s=args.budget,
            progress=args.progress)), format_scan
    if args.mode == "inference":
        from ecmnet_core.bench.inference import PathsBenchConfig, bench_paths, format_paths

        cfg = PathsBenchConfig(
            checkpoint=args.checkpoint, model=args.model if args.random else None, classes=args.classes,
            device=args.device, paths=tuple(args.paths) if args.paths else None, runs=args.runs,
            warmup=args.warmup, budget_s=args.budget, agreement=args.agreement, miou=args.miou,
            miou_split=args.miou_split, miou_limit=args.miou_limit,
            agreement_limit=args.agreement_limit,
            progress=(lambda m: print(m, file=sys.stderr, flush=True)) if args.progress else None)
        if args.sizes:
            cfg.sizes = _sizes(args.sizes)
        return bench_paths(cfg), format_paths
    if args.mode == "profile":
        from ecmnet_core.bench.profile import ProfileConfig, format_profile, profile_path

        return profile_path(ProfileConfig(
            path=args.path, sizes=_sizes(args.sizes), checkpoint=args.checkpoint,
            model=args.model if args.random else None, classes=args.classes, device=args.device, runs=args.runs,
            warmup=args.warmup, top=args.top)), format_profile
    if args.mode == "train":
        from ecmnet_core.bench.training import TrainBenchConfig, bench_train, format_train

        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        return bench_train(TrainBenchConfig(
            size=size, batch=args.batch, classes=args.classes, model=args.model, runs=args.runs,
            warmup=args.warmup, budget_s=max(args.budget, 120.0), data=args.data,
            trainer_allocator=args.trainer_allocator)), format_train
    if args.mode == "baseline":
        from ecmnet_core.bench.baseline import BaselineBenchConfig, bench_baseline, format_baseline

        return bench_baseline(BaselineBenchConfig(
            rev=args.rev, sizes=_sizes(args.sizes) or ((352, 480),), checkpoint=args.checkpoint, runs=args.runs,
            warmup=args.warmup, budget_s=args.budget, dtype=args.dtype,
            image_size=_sizes([args.image_size])[0] if args.image_size else None)), format_baseline
    from ecmnet_core.bench.points import bench_painting, format_painting

    return bench_painting(args.points, size, runs=args.runs, warmup=args.warmup), format_painting


def run(args: argparse.Namespace) -> int:
    from ecmnet_core.checkpoint import CheckpointError

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"bench {args.mode}: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        result, text = _run_mode(args)
    except (ValueError, CheckpointError) as exc:
        raise SystemExit(f"bench {args.mode}: {exc}") from exc
    print(json.dumps(result) if args.json else text(result))
    return 0
