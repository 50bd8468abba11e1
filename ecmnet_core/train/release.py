"""``ecmnet-core release``: turn a training checkpoint into a shippable one (weights and metadata only).

Drops the optimiser/scheduler/RNG state (``training_state``), optionally records model-card figures in the
metadata, and writes atomically. The packaged default model was made this way from ``best.pt``.

``--position-only`` carries a long run across machines without releasing its weights: it writes the run's schedule
position from its ``last.pt`` (iteration, epoch, validation history, EMA update count, the raw and the averaged
weights in fp16; no optimiser state) into the ``continuation`` record of an existing release, whose own weights and
metadata stay as they are. ``ecmnet-core train`` with ``train.init`` on that release goes on from there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ecmnet_core.checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint
from ecmnet_core.train.revive import VANISHED


def release_checkpoint(src: str | Path, dst: str | Path, notes: dict | None = None) -> Path:
    """Copy ``src`` to ``dst`` without training state; ``notes`` are merged into ``metadata``."""
    ckpt = load_checkpoint(src)
    ckpt.training_state = None
    ckpt.metadata = {**ckpt.metadata, **(notes or {}), "released_from": Path(src).name}
    return save_checkpoint(ckpt, dst)


def carry_position(src: str | Path, dst: str | Path) -> Path:
    """Write the position of the run whose ``last.pt`` is ``src`` into the release ``dst`` (weights unchanged)."""
    run = load_checkpoint(src)
    state = run.training_state
    if not state:
        raise CheckpointError(f"{src} has no training state: --position-only needs a run's last.pt")
    if "ema" not in state:
        raise CheckpointError(f"{src} was trained without train.ema_decay: release its best.pt instead")
    rel = load_checkpoint(dst, expect_classes=run.num_classes, expect_model=run.model_config.name)
    if set(rel.state_dict) != set(run.state_dict):
        raise CheckpointError(f"{src} and {dst} hold different architectures (their weight names differ)")
    per_epoch = state.get("iters_per_epoch") or state["total_iters"] // int(run.metadata["recipe"]["train"]["epochs"])

    def fp16(weights: dict) -> dict:
        return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}

    rel.continuation = {
        "epoch": state["epoch"], "iter_in_epoch": state["iter_in_epoch"], "global_iter": state["global_iter"],
        "total_iters": state["total_iters"], "iters_per_epoch": per_epoch, "best_miou": state["best_miou"],
        "best_epoch": state["best_epoch"], "wall_time": state.get("wall_time", 0.0),
        "history": state.get("history", []), "ema_updates": state["ema"]["updates"],
        "raw_weights": fp16(run.state_dict), "ema_weights": fp16(state["ema"]["weights"]),
    }
    rel.metadata = {**rel.metadata, "position_from": f"{Path(src).name}: epoch {state['epoch']}, iteration "
                                                      f"{state['global_iter']} of {state['total_iters']}"}
    return save_checkpoint(rel, dst)




def vanished_weights(state_dict: dict[str, torch.Tensor], threshold: float = VANISHED) -> dict[str, Any]:
    """Weights that training drove to (near) zero: the total below ``threshold`` in magnitude, how many of them are
    denormal (slow on Intel cores, ``ecmnet_core.ops.fp_mode_cpu``), and per tensor with any, the count and, for a
    matrix or convolution weight, the output rows and input columns that vanished entirely (dead channels)."""
    tiny = torch.finfo(torch.float32).tiny
    total = denormal = 0
    tensors: dict[str, dict[str, int]] = {}
    for name, w in state_dict.items():
        if not w.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        w = w.detach().float()
        small = w.abs() < threshold
        count = int(small.sum())
        denormal += int((small & (w != 0) & (w.abs() < tiny)).sum())
        total += count
        if not count:
            continue
        entry = {"vanished": count, "of": w.numel()}
        if w.dim() >= 2:
            flat = small.reshape(w.shape[0], w.shape[1], -1)
            entry["dead_rows"] = int(flat.all(2).all(1).sum())
            entry["dead_cols"] = int(flat.all(2).all(0).sum())
        tensors[name] = entry
    return {"threshold": threshold, "vanished": total, "denormal": denormal, "tensors": tensors}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="training checkpoint (e.g. runs/<run>/best.pt)")
    parser.add_argument("dst", help="where to write the release checkpoint")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                        help="add a metadata entry (repeatable)")
    parser.add_argument("--position-only", action="store_true",
                        help="src is a run's last.pt and dst an existing release: write only the run's schedule "
                             "position (continuation record) into dst, keeping dst's weights")


def run(args: argparse.Namespace) -> int:
    notes = {}
    for item in args.note:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"release: --note {item!r} is not KEY=VALUE")
        notes[key] = value
    if args.position_only and notes:
        raise SystemExit("release: --note and --position-only do not go together (the release's metadata stays)")
    try:
        path = (carry_position(args.src, args.dst) if args.position_only
                else release_checkpoint(args.src, args.dst, notes))
    except CheckpointError as exc:
        raise SystemExit(f"release: {exc}") from exc
    ckpt = load_checkpoint(path)
    print(json.dumps({"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
                      "model": ckpt.model_config.name, "classes": ckpt.num_classes,
                      "input_size": ckpt.input_size, "metadata": ckpt.metadata,
                      "vanished_weights": vanished_weights(ckpt.state_dict)}, indent=2))
    return 0
