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

import torch

from ecmnet_core.checkpoint import CheckpointError, cast_floats, file_sha256, load_checkpoint, save_checkpoint
from ecmnet_core.train.revive import vanished_weights


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

    rel.continuation = {
        "epoch": state["epoch"], "iter_in_epoch": state["iter_in_epoch"], "global_iter": state["global_iter"],
        "total_iters": state["total_iters"], "iters_per_epoch": per_epoch, "best_miou": state["best_miou"],
        "best_epoch": state["best_epoch"], "wall_time": state.get("wall_time", 0.0),
        "history": state.get("history", []), "ema_updates": state["ema"]["updates"],
        "raw_weights": cast_floats(run.state_dict, torch.float16),
        "ema_weights": cast_floats(state["ema"]["weights"], torch.float16),
    }
    rel.metadata = {**rel.metadata, "position_from": f"{Path(src).name}: epoch {state['epoch']}, iteration "
                                                      f"{state['global_iter']} of {state['total_iters']}"}
    return save_checkpoint(rel, dst)


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
