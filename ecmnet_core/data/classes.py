"""Class definitions of the supported datasets: names, RGB palettes, ignore ids and Cityscapes id mapping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ecmnet_core.data.errors import DataError

#: The label id of a pixel without a class: the node's ``~/labels``, painted points, label bags.
UNLABELED = 255


@dataclass
class DatasetInfo:
    """What a model needs to know about a dataset's label space.

    ``palette`` holds one RGB triple per class; label pixels equal to ``ignore_index`` are unlabeled.
    """

    name: str
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if not self.class_names:
            raise DataError(f"dataset {self.name!r}: no class names")
        if len(self.palette) != len(self.class_names):
            raise DataError(
                f"dataset {self.name!r}: {len(self.palette)} palette colours for {len(self.class_names)} classes"
            )
        self.palette = [tuple(int(v) for v in c) for c in self.palette]  # type: ignore[misc]
        if any(len(c) != 3 or min(c) < 0 or max(c) > 255 for c in self.palette):
            raise DataError(f"dataset {self.name!r}: palette entries must be [r, g, b] with values 0..255")
        if 0 <= self.ignore_index < len(self.class_names):
            raise DataError(
                f"dataset {self.name!r}: ignore_index {self.ignore_index} collides with class "
                f"{self.class_names[self.ignore_index]!r}; it must be >= num_classes ({len(self.class_names)})"
            )
        if not 0 <= self.ignore_index <= 255:
            raise DataError(f"dataset {self.name!r}: ignore_index {self.ignore_index} must be in 0..255")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def palette_array(self) -> np.ndarray:
        """(K, 3) uint8 RGB."""
        return np.asarray(self.palette, dtype=np.uint8).reshape(-1, 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": int(self.ignore_index),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        return cls(d["name"], list(d["class_names"]), [tuple(c) for c in d["palette"]], int(d["ignore_index"]))


CAMVID = DatasetInfo(
    name="camvid",
    class_names=["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                 "Pedestrian", "Bicyclist"],
    palette=[(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
             (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)],
    ignore_index=11,
)

CITYSCAPES = DatasetInfo(
    name="cityscapes",
    class_names=["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                 "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                 "bicycle"],
    palette=[(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
             (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
             (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)],
    ignore_index=255,
)

#: Official Cityscapes labelIds of the 19 evaluated classes, in train-id order (cityscapesscripts labels.py).
CITYSCAPES_TRAINID_TO_ID = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33],
                                    dtype=np.uint8)
#: Highest labelId of the official table; license plate (-1) is stored as 255 in uint8 label images.
CITYSCAPES_MAX_LABEL_ID = 33

CITYSCAPES_ID_TO_TRAINID = np.full(256, 255, dtype=np.uint8)
CITYSCAPES_ID_TO_TRAINID[CITYSCAPES_TRAINID_TO_ID] = np.arange(19, dtype=np.uint8)


def cityscapes_to_trainid(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds (any shape, uint8) -> train ids 0..18, 255 = ignore."""
    return CITYSCAPES_ID_TO_TRAINID[np.asarray(label_ids, dtype=np.uint8)]


def trainid_to_labelid(labels: np.ndarray) -> np.ndarray:
    """Train ids 0..18 -> official Cityscapes labelIds (for cityscapesscripts); anything else -> 0 (unlabeled)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:19] = CITYSCAPES_TRAINID_TO_ID
    labels = np.asarray(labels)
    if labels.dtype != np.uint8:
        labels = np.where((labels >= 0) & (labels < 19), labels, 255).astype(np.uint8)
    return lut[labels]


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Colours (RGB) for classes without a stored palette (folder datasets, random-weight checkpoints): the
    PASCAL-VOC bit-interleaved palette, distinct and deterministic for any K <= 256."""
    out = []
    for i in range(num_classes):
        r = g = b = 0
        c = i + 1  # start at 1 so class 0 is not black (black reads as "unlabeled" in overlays)
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def bgr_lut(palette: Any) -> np.ndarray:
    """(256, 3) uint8 lookup table class id -> BGR colour from an RGB ``palette`` (K x 3); ids >= K (255 =
    unlabeled) stay black. ``bgr_lut(palette)[labels]`` colours a label image."""
    rgb = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(rgb)] = rgb[:, ::-1]
    return lut


def load_classes_yaml(path: str | Path, name: str = "folder") -> DatasetInfo:
    """Read a folder dataset's ``classes.yaml``: ``names: [...]``, optional ``palette``, optional ``ignore_index``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"classes file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"classes file {path} is not readable YAML: {e}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f"classes file {path}: expected a mapping with a 'names' list")
    names = data["names"]
    if isinstance(names, dict):  # YOLO-style {0: a, 1: b}
        if sorted(names) != list(range(len(names))):
            raise DataError(f"classes file {path}: 'names' mapping keys must be 0..K-1")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"classes file {path}: 'names' must be a non-empty list of strings")
    palette = data.get("palette")
    if palette is None:
        palette = default_palette(len(names))
    elif not isinstance(palette, list) or not all(isinstance(c, (list, tuple)) for c in palette):
        raise DataError(f"classes file {path}: 'palette' must be a list of [r, g, b]")
    ignore = data.get("ignore_index", 255)
    if not isinstance(ignore, int):
        raise DataError(f"classes file {path}: 'ignore_index' must be an integer, got {ignore!r}")
    try:
        return DatasetInfo(name=name, class_names=names, palette=palette, ignore_index=ignore)
    except DataError as e:
        raise DataError(f"classes file {path}: {e}") from None


def dataset_info(name: str) -> DatasetInfo:
    """The built-in :class:`DatasetInfo` called ``name`` ("camvid" or "cityscapes")."""
    table = {"camvid": CAMVID, "cityscapes": CITYSCAPES}
    if name not in table:
        raise DataError(f"unknown dataset {name!r}; built-in: {', '.join(table)}")
    return table[name]


__all__ = [
    "CAMVID", "CITYSCAPES", "CITYSCAPES_ID_TO_TRAINID", "CITYSCAPES_TRAINID_TO_ID", "UNLABELED", "DatasetInfo",
    "bgr_lut", "cityscapes_to_trainid", "dataset_info", "default_palette", "load_classes_yaml",
    "trainid_to_labelid",
]
