"""One sample on disk (image + optional label) and the functions that decode it.

Images are decoded with cv2 as BGR uint8 (H, W, 3); labels as single-channel class-id maps (H, W) uint8 in
*train ids*: Cityscapes labelIds are mapped through the official table here, so nothing downstream (transforms,
model, metrics) ever sees raw labelIds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ecmnet_core.data.classes import CITYSCAPES_ID_TO_TRAINID
from ecmnet_core.data.errors import DataError

#: How a label file encodes classes: "train" = already train ids, "cityscapes" = official labelIds.
LABEL_ENCODINGS = ("train", "cityscapes")


@dataclass
class Sample:
    """One image and its optional label file.

    ``label_encoding`` says how the label file stores classes ("train" ids, or Cityscapes "cityscapes" labelIds).
    """

    image: Path
    label: Path | None
    stem: str
    label_encoding: str = "train"

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.label = Path(self.label) if self.label is not None else None
        if self.label_encoding not in LABEL_ENCODINGS:
            raise DataError(f"sample {self.stem}: unknown label_encoding {self.label_encoding!r}")


def decode_image(data: bytes | np.ndarray, name: str) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) BGR uint8 (grey images are replicated to 3 channels)."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None:
        raise DataError(f"image {name} cannot be decoded (corrupt or not an image)")
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) BGR uint8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except OSError as e:
        raise DataError(f"image {path} is not readable: {e}") from None
    return decode_image(data, str(path))


def decode_label(data: bytes | np.ndarray, name: str, encoding: str = "train") -> np.ndarray:
    """Encoded single-channel label bytes -> (H, W) uint8 train ids."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    label = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if label is None:
        raise DataError(f"label {name} cannot be decoded (corrupt or not an image)")
    if label.ndim != 2:
        raise DataError(
            f"label {name} has shape {label.shape}; expected a single-channel class-id PNG "
            "(colour-coded labels must be converted to class ids first)"
        )
    if label.dtype != np.uint8:
        if label.dtype.kind not in "ui" or label.max(initial=0) > 255:
            raise DataError(f"label {name} has dtype {label.dtype} with values above 255; expected 8-bit class ids")
        label = label.astype(np.uint8)
    if encoding == "cityscapes":
        label = CITYSCAPES_ID_TO_TRAINID[label]
    return label


def read_label(path: str | Path, encoding: str = "train") -> np.ndarray:
    """Read a label file as (H, W) uint8 train ids."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"label {path} does not exist") from None
    except OSError as e:
        raise DataError(f"label {path} is not readable: {e}") from None
    return decode_label(data, str(path), encoding)


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """(BGR uint8 image, uint8 train-id label or None)."""
    image = read_image(sample.image)
    label = read_label(sample.label, sample.label_encoding) if sample.label is not None else None
    if label is not None and label.shape != image.shape[:2]:
        raise DataError(
            f"label {sample.label} is {label.shape[1]}x{label.shape[0]} but image {sample.image} is "
            f"{image.shape[1]}x{image.shape[0]} (WxH)"
        )
    return image, label


def write_image(path: str | Path, array: np.ndarray) -> Path:
    """Write an image (PNG, JPEG ... by suffix) with cv2, creating the folder; OSError naming the file if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")
    return path
