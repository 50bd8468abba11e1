"""Up-front checks of a sample list, so a bad file fails at start-up with its name, not mid-epoch."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from ecmnet_core.data.classes import CITYSCAPES_MAX_LABEL_ID, DatasetInfo
from ecmnet_core.data.errors import DataError
from ecmnet_core.data.io import Sample, read_label

#: How many problems one DataError lists before summarising the rest.
MAX_LISTED = 5


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image from its header only (no pixel decode)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"image {path} is not a readable image: {e}") from None
    return h, w


def _raw_label_values(sample: Sample) -> tuple[np.ndarray, tuple[int, int]]:
    """Histogram (256,) of the *stored* label values and the label's (H, W)."""
    raw = read_label(sample.label, "train")  # raw stored ids: the encoding check happens on them
    return np.bincount(raw.ravel(), minlength=256), raw.shape


def check_sample(sample: Sample, info: DatasetInfo) -> None:
    """Raise DataError if the sample's files are missing/unreadable, sizes differ, or label values are invalid."""
    h, w = image_size(sample.image)
    if sample.label is None:
        return
    hist, shape = _raw_label_values(sample)
    if shape != (h, w):
        raise DataError(
            f"label {sample.label} is {shape[1]}x{shape[0]} but image {sample.image} is {w}x{h} (WxH)"
        )
    values = np.flatnonzero(hist)
    if sample.label_encoding == "cityscapes":
        bad = values[(values > CITYSCAPES_MAX_LABEL_ID) & (values != 255)]
        what = f"Cityscapes labelIds must be 0..{CITYSCAPES_MAX_LABEL_ID} (or 255 for -1)"
    else:
        bad = values[(values >= info.num_classes) & (values != info.ignore_index)]
        what = f"class ids must be in [0, {info.num_classes}) or the ignore id {info.ignore_index}"
    if bad.size:
        raise DataError(f"label {sample.label} has values {bad.tolist()[:10]}: {what} ({info.name})")


def validate_samples(samples: Sequence[Sample], info: DatasetInfo, what: str, workers: int = 4) -> None:
    """Check every sample (threads: decoding releases the GIL); raise one DataError listing the problems.

    ``what`` names the split in the message, e.g. ``"camvid split 'train' at /data/camvid"``.
    """
    if len(samples) == 0:
        raise DataError(f"{what} is empty")
    problems: list[str] = []

    def check(s: Sample) -> str | None:
        try:
            check_sample(s, info)
        except DataError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(check, samples) if p is not None]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{what}: {len(problems)} of {len(samples)} samples are bad:\n  {listed}{more}")
