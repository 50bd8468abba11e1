"""``SegmentationDataset``: samples (files or shards) + a transform -> normalised tensors for a DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ecmnet_core.data.classes import DatasetInfo
from ecmnet_core.data.io import Sample, load_sample

if TYPE_CHECKING:
    from ecmnet_core.data.shards import ShardReader

Transform = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def load_raw(samples: Sequence[Sample] | ShardReader, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(BGR uint8 image, uint8 train-id label or None) of sample ``index`` from files or shards."""
    if hasattr(samples, "load"):
        return samples.load(index)  # ShardReader
    return load_sample(samples[index])


class SegmentationDataset(Dataset):
    """Image/label pairs as ``(image (3, H, W) float32 normalised RGB, label (H, W) int64)``.

    Labels are train ids (Cityscapes labelIds are mapped when read); ``info.ignore_index`` is kept as is and
    samples without a label get an all-ignore label.

    Randomness: with ``seed`` set, sample ``i`` in epoch ``e`` uses ``np.random.default_rng((seed, e, i))``, so
    augmentation is identical whatever the data source (files or shards), worker count or order; call
    :meth:`set_epoch` each epoch. With ``seed=None`` each call draws a fresh generator from torch's RNG (so
    ``torch.manual_seed`` and the DataLoader's per-worker seeding still make runs reproducible).
    """

    def __init__(
        self,
        samples: Sequence[Sample] | ShardReader,
        transform: Transform,
        info: DatasetInfo,
        seed: int | None = None,
        cache: bool = False,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.info = info
        self.seed = seed
        self.epoch = 0
        #: decoded (image, label) pairs as uint8, kept after the first read (``cache=True``); fill it with
        #: :meth:`fill_cache` before DataLoader workers fork, so they share it instead of decoding again
        self.cache: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = {} if cache else None

    def fill_cache(self) -> int:
        """Decode every sample into the cache now; returns its size in bytes (0 without a cache)."""
        if self.cache is None:
            return 0
        for i in range(len(self)):
            self._raw(i)
        return sum(im.nbytes + (lb.nbytes if lb is not None else 0) for im, lb in self.cache.values())

    def _raw(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.cache is None:
            return load_raw(self.samples, index)
        if index not in self.cache:
            self.cache[index] = load_raw(self.samples, index)
        return self.cache[index]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def stem(self, index: int) -> str:
        return self.samples[index].stem

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng((self.seed, self.epoch, index))
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        index %= len(self)
        image, label = self._raw(index)
        if label is None:
            label = np.full(image.shape[:2], self.info.ignore_index, dtype=np.uint8)
        return self.transform(image, label, self._rng(index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name}, {len(self)} samples, transform={self.transform!r})"
