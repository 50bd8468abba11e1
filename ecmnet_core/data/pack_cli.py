"""``ecmnet-core pack``: pack dataset splits into tar shards (:func:`ecmnet_core.data.shards.pack`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ecmnet_core.data.builders import build_dataset, detect_kind
from ecmnet_core.data.errors import DataError
from ecmnet_core.data.layout import KINDS
from ecmnet_core.data.shards import IMAGE_FORMATS, pack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root (camvid / cityscapes / folder layout)")
    parser.add_argument("--kind", default="auto", choices=("auto", *[k for k in KINDS if k != "shards"]),
                        help="dataset layout (default: detect)")
    parser.add_argument("--split", action="append", required=True,
                        help="split to pack; repeat for several (e.g. --split train --split val)")
    parser.add_argument("--list-file", action="append", default=None,
                        help="optional 'image label' list per --split, in the same order")
    parser.add_argument("--classes", default=None, help="classes.yaml for a folder dataset")
    parser.add_argument("--out", required=True, help="output folder for the shards and index.json")
    parser.add_argument("--format", default="jpeg", choices=tuple(IMAGE_FORMATS),
                        help="image encoding: jpeg (small) or png (lossless, byte-identical decode)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1..100 (default 95)")
    parser.add_argument("--shard-size-mb", type=float, default=16, help="target shard size in MiB (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    parser.add_argument("--workers", type=int, default=4, help="encoding threads (default 4)")


def run(args: argparse.Namespace) -> int:
    try:
        _run(args)
    except DataError as e:
        print(f"ecmnet-core pack: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    kind = detect_kind(args.data) if args.kind == "auto" else args.kind
    if kind == "shards":
        raise DataError(f"--data {args.data} is already a shard folder")
    if args.list_file is not None and len(args.list_file) != len(args.split):
        raise DataError(f"--list-file given {len(args.list_file)} times for {len(args.split)} --split values")
    samples_by_split, info = {}, None
    for n, split in enumerate(args.split):
        lf = args.list_file[n] if args.list_file else None
        info, samples = build_dataset(kind, args.data, split, list_file=lf, classes_yaml=args.classes)
        samples_by_split[split] = samples
    assert info is not None
    pack(samples_by_split, info, args.out, fmt=args.format, quality=args.quality, shard_size_mb=args.shard_size_mb,
         source=str(Path(args.data).resolve()), overwrite=args.overwrite, workers=args.workers)
