"""``ecmnet-core train``: a YAML recipe (path or shipped name) plus command-line overrides.

Single process::

    ecmnet-core train --config camvid.yaml --data ../shared/camvid --out runs/camvid

Several GPUs or nodes (DistributedDataParallel, one process per GPU; gloo on CPU)::

    torchrun --nproc_per_node 4 -m ecmnet_core train --config cityscapes.yaml --data /data/cityscapes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

#: Shortcut flags -> config keys; every other key is reachable with --set section.key=value.
SHORTCUTS = {
    "model": "model.name",
    "kind": "data.kind",
    "epochs": "train.epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "crop": "data.crop",
    "base_scale": "data.base_scale",
    "val_scale": "data.val_scale",
    "workers": "data.workers",
    "val_every": "train.val_every",
    "device": "train.device",
    "amp": "train.amp",
    "grad_clip": "train.grad_clip",
    "seed": "train.seed",
    "max_iters": "train.max_iters",
    "sync_bn": "train.sync_bn",
    "checkpoint_every": "train.checkpoint_every",
    "scan_backend": "model.scan_backend",
    "init": "train.init",
    "path": "train.path",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecmnet_core.ops.selective_scan import BACKENDS
    from ecmnet_core.train.config import CONFIG_DIR

    recipes = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    parser.add_argument("--config", required=True,
                        help=f"YAML recipe: a path, or a shipped name ({recipes})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set optim.lr=0.002 --set data.flip=false")
    parser.add_argument("--data", default=None, help="dataset root (data.root)")
    parser.add_argument("--out", default=None,
                        help="run folder (default: runs/<config>-<model>-<time>; required with --resume auto)")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a last.pt; 'auto' uses <out>/last.pt when it exists")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT|packaged",
                        help="warm start from these model weights (a fresh optimiser and schedule); "
                             "ignored when --resume finds a last.pt")
    parser.add_argument("--path", default=None, choices=["default", "baseline"],
                        help="training step: default (fast CPU path) or baseline (fp32 NCHW PyTorch), same function")
    parser.add_argument("--model", default=None, help="ecmnet, lines_msau, lines or baseline")
    parser.add_argument("--kind", default=None, choices=["camvid", "cityscapes", "folder", "shards"],
                        help="dataset layout (default: detected)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the schedule (train.epochs)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process and iteration")
    parser.add_argument("--lr", type=float, default=None, help="base learning rate")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None, help="training crop")
    parser.add_argument("--base-scale", type=float, default=None,
                        help="resize every training image by this factor before augmentation (e.g. 0.5)")
    parser.add_argument("--val-scale", type=float, default=None,
                        help="validate on images resized by this factor; labels stay full size")
    parser.add_argument("--workers", type=int, default=None, help="data-loading worker processes")
    parser.add_argument("--val-every", type=int, default=None,
                        help="validate every N epochs (and at the end); 0: never (smoke runs)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (CUDA only)")
    parser.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (0: off)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the initial weights, data order and augmentation (train.seed)")
    parser.add_argument("--max-iters", type=int, default=None,
                        help="stop at iteration N (smoke runs); the schedule is the full one, so --resume auto "
                             "with a larger N (or none) goes on")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                        help="SyncBatchNorm across processes (DDP)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="also write last.pt every N iterations")
    parser.add_argument("--scan-backend", default=None,
                        help=f"selective-scan backend: {', '.join(BACKENDS)} (default automatic)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    parser.add_argument("--no-plots", action="store_true", help="no loss.png / miou.png (no matplotlib needed)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def resolve_config(args: argparse.Namespace):
    """The recipe with shortcut flags, ``--set`` and ``--data`` applied (``--set`` wins over shortcuts)."""
    from ecmnet_core.train.config import load_config

    overrides = []
    for attr, key in SHORTCUTS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(list(value) if isinstance(value, (list, tuple)) else value)}")
    if args.data is not None:
        overrides.append(f"data.root={json.dumps(str(args.data))}")
    if args.no_progress:
        overrides.append("train.progress=false")
    return load_config(args.config, overrides + list(args.overrides))


def default_run_dir(config_name: str, model: str) -> Path:
    return Path("runs") / f"{Path(config_name).stem}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    import yaml

    from ecmnet_core.allocator import keep_freed_memory
    from ecmnet_core.checkpoint import CheckpointError
    from ecmnet_core.data import DataError
    from ecmnet_core.train.config import ConfigError

    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if args.resume == "auto" and args.out is None:
        print("train: --resume auto needs --out RUN_DIR (the folder holding last.pt)", file=sys.stderr)
        return 2

    from ecmnet_core.train.distributed import cleanup, init_distributed
    from ecmnet_core.train.trainer import Trainer, TrainingError

    run_dir = Path(args.out) if args.out else None
    env = None
    try:
        env = init_distributed(config.train.device)
        if run_dir is None:
            from ecmnet_core.train.distributed import broadcast_object

            run_dir = Path(broadcast_object(str(default_run_dir(args.config, config.model.name)), env))
        created = not run_dir.exists()
        try:
            trainer = Trainer(config, run_dir, env, resume=args.resume, tensorboard=not args.no_tensorboard,
                              plots=not args.no_plots)
        except BaseException:
            if created and env.is_main:  # a run that never started leaves no folder behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if env.is_main:  # written once the recipe is accepted: a refused resume keeps the run's own config.yaml
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if trainer.path.keep_freed_memory:
            # process-wide, so here and not in the library's Trainer: this process only trains
            keep_freed_memory()
        result = trainer.fit()
    except (ConfigError, DataError, CheckpointError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    if env is not None and env.is_main:
        best = f"{100 * result.best_miou:.2f}% at epoch {result.best_epoch}" if result.best_miou >= 0 else "n/a"
        val = result.last_val or {}
        last = (f"{100 * val['miou']:.2f}% (framework {100 * val['miou_framework']:.2f}%)"
                if val.get("miou") is not None else "n/a")
        print(f"run {run_dir}: {result.iterations} iterations ({result.epochs_done} complete epochs), stopped: "
              f"{result.stopped}")
        print(f"last val mIoU {last}, best {best}; wall time {result.wall_time_s:.0f} s this session")
        print(f"checkpoints: {run_dir / 'last.pt'}" + (f", {run_dir / 'best.pt'}" if result.best_miou >= 0 else ""))
    if result.stopped == "signal":
        return 128 + int(result.signal or 2)
    return 0
