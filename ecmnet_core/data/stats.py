"""Dataset statistics the LETNet/ECMNet framework trains with: per-channel BGR mean/std and ENet class weights."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ecmnet_core.data.classes import DatasetInfo
from ecmnet_core.data.dataset import load_raw
from ecmnet_core.data.errors import DataError
from ecmnet_core.data.io import Sample

if TYPE_CHECKING:
    from ecmnet_core.data.shards import ShardReader

CACHE_VERSION = 1


@dataclass
class DatasetStats:
    """``mean_bgr``/``std_bgr`` on the 0..255 scale; ``class_frequency`` over valid pixels; ``class_weights``
    ENet style ``1 / ln(1.10 + p)``."""

    mean_bgr: list[float]
    std_bgr: list[float]
    class_frequency: list[float]
    class_weights: list[float]
    num_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def enet_weights(frequency: np.ndarray, c: float = 1.10) -> np.ndarray:
    """ENet class weighting ``1 / ln(c + p)``."""
    return 1.0 / np.log(c + np.asarray(frequency, dtype=np.float64))


def _cache_key(samples: Sequence[Sample] | ShardReader, info: DatasetInfo) -> str:
    """Hash of the file list with sizes and mtimes, so editing a file invalidates the cache."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, info.to_dict()]).encode())
    if hasattr(samples, "fingerprint"):
        h.update(samples.fingerprint().encode())
    else:
        for s in samples:
            for p in (s.image, s.label):
                if p is None:
                    h.update(b"-")
                    continue
                st = p.stat()
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{s.label_encoding}\n".encode())
    return h.hexdigest()


def compute_stats(
    samples: Sequence[Sample] | ShardReader, info: DatasetInfo, cache: str | Path | None = None
) -> DatasetStats:
    """Per-image BGR mean/std averaged over images (LETNet framework) and class weights from pixel frequency.

    Pixel frequency ``p_c`` counts only valid pixels (label in [0, K)); the ignore id never enters it.
    ``cache``: a JSON file; reused when it was computed from the same files, rewritten otherwise.
    """
    if len(samples) == 0:
        raise DataError("compute_stats: no samples")
    key = _cache_key(samples, info) if cache is not None else ""
    if cache is not None:
        cache = Path(cache)
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return DatasetStats(**data["stats"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or stale cache: recompute
    k = info.num_classes
    mean = np.zeros(3, dtype=np.float64)
    std = np.zeros(3, dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    for i in range(len(samples)):
        image, label = load_raw(samples, i)
        m, sd = cv2.meanStdDev(image)  # per-channel, population std, float64 accumulation
        mean += m.ravel()
        std += sd.ravel()
        if label is not None:
            counts += np.bincount(label.ravel(), minlength=256)[:k]
    n = len(samples)
    total = counts.sum()
    freq = counts / total if total else np.zeros(k)
    stats = DatasetStats(
        mean_bgr=(mean / n).tolist(),
        std_bgr=(std / n).tolist(),
        class_frequency=freq.tolist(),
        class_weights=[float(w) if math.isfinite(w) else 0.0 for w in enet_weights(freq)],
        num_images=n,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(cache.suffix + ".tmp")
        tmp.write_text(json.dumps({"key": key, "stats": stats.to_dict()}, indent=1))
        tmp.replace(cache)
    return stats
