"""``ecmnet-core predict``: segment images, folders and videos; write labels, colour masks and overlays.

For every input image (or video frame ``<video>_<frame:06d>``) three PNGs go to ``--out``:
``<stem>_labels.png`` (single-channel class ids at the input size, 255 = unlabeled), ``<stem>_color.png``
(palette colours) and ``<stem>_overlay.png`` (colours blended over the image). Predictions are made exactly as
in ``eval`` (:func:`ecmnet_core.inference.pipeline.segment_images`), several images per forward pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from ecmnet_core.data.io import write_image
from ecmnet_core.progress import Progress

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


class InputError(ValueError):
    """An input path that is missing, unreadable or of an unknown type."""


def expand_inputs(inputs: list[str]) -> list[tuple[str, Path]]:
    """``(kind, path)`` per image or video: folders are expanded (sorted, not recursive)."""
    out: list[tuple[str, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           | VIDEO_EXTENSIONS)
            if not found:
                raise InputError(f"input folder {path} holds no images or videos")
            out += [("video" if p.suffix.lower() in VIDEO_EXTENSIONS else "image", p) for p in found]
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix in VIDEO_EXTENSIONS:
                out.append(("video", path))
            elif suffix in IMAGE_EXTENSIONS:
                out.append(("image", path))
            else:
                raise InputError(f"input {path}: unknown file type {suffix!r} (images: "
                                 f"{', '.join(sorted(IMAGE_EXTENSIONS))}; "
                                 f"videos: {', '.join(sorted(VIDEO_EXTENSIONS))})")
        else:
            raise InputError(f"input {path} does not exist")
    return out


def iter_frames(inputs: list[tuple[str, Path]],
                skip: Callable[[str], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(stem, BGR uint8 image)`` for every image and every video frame, in order. An input that cannot be read
    raises :class:`InputError`, or with ``skip`` is passed over after ``skip(reason)``."""
    from ecmnet_core.data import DataError, read_image

    def fail(message: str) -> None:
        if skip is None:
            raise InputError(message)
        skip(message)

    for kind, path in inputs:
        if kind == "image":
            try:
                image = read_image(path)
            except DataError as exc:
                fail(str(exc))
                continue
            yield path.stem, image
            continue
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            fail(f"video {path} cannot be opened (unsupported codec or not a video)")
            continue
        index = 0
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                yield f"{path.stem}_{index:06d}", frame
                index += 1
        finally:
            cap.release()
        if index == 0:
            fail(f"video {path} has no readable frames")


def _batches(frames: Iterator[tuple[str, np.ndarray]], size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    batch: list[tuple[str, np.ndarray]] = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _unique(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``... when two inputs share a name."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecmnet_core.inference.options import add_segmenter_arguments

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or video files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (default: the packaged ecmnet_core/weights/ecmnet_camvid.pt)")
    add_segmenter_arguments(parser)
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour mask (0..1)")
    parser.add_argument("--save-confidence", action="store_true",
                        help="also write <stem>_confidence.png: the calibrated probability of each pixel's class, "
                             "x255 (mono8)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass (default: 8 on CUDA, 1 on the CPU)")


def run(args: argparse.Namespace) -> int:
    from ecmnet_core.checkpoint import CheckpointError
    from ecmnet_core.inference import Segmenter
    from ecmnet_core.inference.options import inference_config_from_args
    from ecmnet_core.inference.pipeline import confidence_image, segment_images

    if not 0.0 <= args.alpha <= 1.0:
        print(f"predict: --alpha must be in [0, 1], got {args.alpha}", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print(f"predict: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        inputs = expand_inputs(args.inputs)
        segmenter = Segmenter(inference_config_from_args(args))
    except (InputError, CheckpointError, ValueError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch_size = args.batch_size or (8 if segmenter.device.type == "cuda" else 1)
    desc = segmenter.describe()
    print(f"checkpoint {desc['checkpoint']} ({desc['checkpoint_hash']}), model {desc['model']}, "
          f"input {desc['input_size']}, device {desc['device']}, {len(inputs)} image/video file(s) from "
          f"{len(args.inputs)} argument(s) -> {out}", file=sys.stderr)
    used: set[str] = set()
    bad: list[str] = []

    def skip(reason: str) -> None:
        bad.append(reason)
        print(f"predict: skipped: {reason}", file=sys.stderr)
    count, start, first_s = 0, time.perf_counter(), 0.0
    progress = Progress("predict", "image")
    try:
        for batch in _batches(iter_frames(inputs, skip), batch_size):
            probs: list[np.ndarray] | None = [] if args.save_confidence else None
            labels = segment_images(segmenter, [image for _, image in batch], confidence=probs)
            for i, ((stem, image), lab) in enumerate(zip(batch, labels)):
                name = _unique(stem, used)
                write_image(out / f"{name}_labels.png", lab)
                if probs is not None:
                    write_image(out / f"{name}_confidence.png", confidence_image(probs[i]))
                write_image(out / f"{name}_color.png", segmenter.colorize(lab))
                write_image(out / f"{name}_overlay.png", segmenter.overlay(image, lab, args.alpha))
            if count == 0:  # the first batch also traces and warms the model up: timed on its own
                first_s, start = time.perf_counter() - start, time.perf_counter()
            count += len(batch)
            progress.update(len(batch))
    except (InputError, OSError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    progress.close()
    elapsed = time.perf_counter() - start
    steady = count - min(count, batch_size)
    rate = f"{1000 * elapsed / steady:.0f} ms each after the first" if steady else "one batch only"
    print(f"{count} image(s) segmented ({rate}; the first batch, with the model's warm-up, took {first_s:.1f} s), "
          f"written to {out}")
    if bad:
        print(f"predict: {len(bad)} file(s) could not be read and were skipped (listed above)", file=sys.stderr)
        return 2  # bad input, as for every command
    return 0


