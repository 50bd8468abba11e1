"""Tiny generated datasets in the real on-disk layouts, for tests and smoke runs (never for benchmarks).

Labels are random axis-aligned blocks of classes with some ignore pixels; images are the class colour plus noise,
so the pixels do predict the labels (a model can learn them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from ecmnet_core.data.classes import CAMVID, CITYSCAPES_TRAINID_TO_ID, DatasetInfo, bgr_lut
from ecmnet_core.data.io import write_image


def random_label(rng: np.random.Generator, size: tuple[int, int], num_classes: int, ignore_index: int,
                 blocks: int = 12, ignore_fraction: float = 0.05) -> np.ndarray:
    """(H, W) uint8: a background class overdrawn with random rectangles; a few rectangles are ``ignore_index``."""
    h, w = size
    label = np.full((h, w), rng.integers(num_classes), dtype=np.uint8)
    for _ in range(blocks):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = y0 + rng.integers(2, max(3, h // 2)), x0 + rng.integers(2, max(3, w // 2))
        cls = ignore_index if rng.random() < ignore_fraction * 4 else rng.integers(num_classes)
        label[y0:y1, x0:x1] = cls
    return label


def render_image(rng: np.random.Generator, label: np.ndarray, info: DatasetInfo, noise: float = 20.0) -> np.ndarray:
    """(H, W, 3) BGR uint8: each pixel the (RGB palette -> BGR) colour of its class plus Gaussian noise."""
    lut = bgr_lut(info.palette).astype(np.float32)
    image = lut[label] + rng.normal(0, noise, label.shape + (3,))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_camvid(root: str | Path, splits: dict[str, int] | None = None, size: tuple[int, int] = (64, 96),
                seed: int = 0, list_files: bool = True) -> Path:
    """SegNet CamVid layout: ``<split>/`` + ``<split>annot/`` and ``<split>.txt`` lists with the
    ``/SegNet/CamVid/`` absolute prefix, like ``shared/camvid``. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (splits or {"train": 4, "val": 2}).items():
        lines = []
        for i in range(n):
            stem = f"0001TP_{split}{i:04d}"
            label = random_label(rng, size, CAMVID.num_classes, CAMVID.ignore_index)
            write_image(root / split / f"{stem}.png", render_image(rng, label, CAMVID))
            write_image(root / f"{split}annot" / f"{stem}.png", label)
            lines.append(f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png")
        if list_files:
            (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_cityscapes(root: str | Path, splits: dict[str, int] | None = None, size: tuple[int, int] = (64, 128),
                    seed: int = 0, cities: tuple[str, ...] = ("aachen", "bochum")) -> Path:
    """Official Cityscapes layout with *labelIds* (some non-evaluated ids such as 0, 1, 4, 9 mixed in)."""
    from ecmnet_core.data.classes import CITYSCAPES

    root = Path(root)
    rng = np.random.default_rng(seed)
    extra_ids = np.array([0, 1, 4, 9, 14, 29], dtype=np.uint8)  # ids that map to ignore
    for split, n in (splits or {"train": 2, "val": 2}).items():
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            train = random_label(rng, size, CITYSCAPES.num_classes, 255)
            evaluated = CITYSCAPES_TRAINID_TO_ID[np.minimum(train, 18)]
            ids = np.where(train == 255, rng.choice(extra_ids, size=train.shape), evaluated).astype(np.uint8)
            image = render_image(rng, train, CITYSCAPES)
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
            write_image(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
    return root


def make_folder(root: str | Path, names: list[str] | None = None, n: int = 3, size: tuple[int, int] = (48, 64),
                seed: int = 0, ignore_index: int = 255, palette: bool = True) -> Path:
    """``images/`` + ``labels/`` + ``classes.yaml`` (flat layout)."""
    root = Path(root)
    names = names or ["ground", "object", "sky"]
    info = DatasetInfo("folder", names, [(40 * i % 256, 255 - 60 * i % 256, 90) for i in range(len(names))],
                       ignore_index)
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = random_label(rng, size, len(names), ignore_index)
        write_image(root / "images" / f"img{i:03d}.jpg", render_image(rng, label, info))
        write_image(root / "labels" / f"img{i:03d}.png", label)
    spec = {"names": names, "ignore_index": ignore_index}
    if palette:
        spec["palette"] = [list(c) for c in info.palette]
    (root / "classes.yaml").write_text(yaml.safe_dump(spec))
    return root
