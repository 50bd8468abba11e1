"""``ecmnet-core release``: turn a training checkpoint into a shippable one (weights and metadata only).

Drops the optimiser/scheduler/RNG state (``training_state``), optionally records model-card figures in the
metadata, and writes atomically. The packaged default model was made this way from ``best.pt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecmnet_core.checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint


def release_checkpoint(src: str | Path, dst: str | Path, notes: dict | None = None) -> Path:
    """Copy ``src`` to ``dst`` without training state; ``notes`` are merged into ``metadata``."""
    ckpt = load_checkpoint(src)
    ckpt.training_state = None
    ckpt.metadata = {**ckpt.metadata, **(notes or {}), "released_from": Path(src).name}
    return save_checkpoint(ckpt, dst)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="training checkpoint (e.g. runs/<run>/best.pt)")
    parser.add_argument("dst", help="where to write the release checkpoint")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                        help="add a metadata entry (repeatable)")


def run(args: argparse.Namespace) -> int:
    notes = {}
    for item in args.note:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"release: --note {item!r} is not KEY=VALUE")
        notes[key] = value
    try:
        path = release_checkpoint(args.src, args.dst, notes)
    except CheckpointError as exc:
        raise SystemExit(f"release: {exc}") from exc
    ckpt = load_checkpoint(path)
    print(json.dumps({"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
                      "model": ckpt.model_config.name, "classes": ckpt.num_classes,
                      "input_size": ckpt.input_size, "metadata": ckpt.metadata}, indent=2))
    return 0
