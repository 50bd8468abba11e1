"""Packed tar shards: a dataset split as a few large files, read with random access through an index.

Layout of a shard folder::

    index.json                      # dataset info, splits, per-sample shard/offset/size, image format
    train-00000.tar, train-00001.tar, ...
    val-00000.tar, ...

Each tar holds ``<stem>.jpg`` (or ``.png``) and ``<stem>.label.png`` (single-channel train ids; Cityscapes labelIds
are mapped at pack time). ``ShardReader`` reads members straight from the tars with ``os.pread`` at the offsets in
the index, so it needs no extraction and works with DataLoader workers (files are opened per process).
PNG mode is lossless: decoded images are byte-identical to the source, so training from shards gives the same
batches as training from the folders with the same seed.

CLI: ``ecmnet-core pack --data ROOT --split train --split val --out DIR --format jpeg --quality 90``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ecmnet_core.data.classes import DatasetInfo
from ecmnet_core.data.errors import DataError
from ecmnet_core.data.io import Sample, decode_image, decode_label, load_sample
from ecmnet_core.data.layout import UNION_SPLITS

FORMAT = "ecmnet-shards"
VERSION = 1
INDEX_NAME = "index.json"
IMAGE_FORMATS = {"jpeg": ".jpg", "png": ".png"}
MiB = 1 << 20


@dataclass(frozen=True)
class ShardRecord:
    """Where one sample lives: shard file name, (offset, size) of the image and label members, image size."""

    stem: str
    shard: str
    image: tuple[int, int]
    label: tuple[int, int] | None
    height: int
    width: int

    def to_dict(self) -> dict[str, Any]:
        return {"stem": self.stem, "shard": self.shard, "image": list(self.image),
                "label": list(self.label) if self.label else None, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(d["stem"], d["shard"], tuple(d["image"]), tuple(d["label"]) if d.get("label") else None,
                   int(d["height"]), int(d["width"]))


# --- writing ---------------------------------------------------------------------------------------------------
def _encode(sample: Sample, fmt: str, quality: int) -> tuple[bytes, bytes | None, int, int]:
    image, label = load_sample(sample)
    if fmt == "jpeg":
        ok, img = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        ok, img = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise DataError(f"image {sample.image}: encoding to {fmt} failed")
    lab = None
    if label is not None:
        ok, enc = cv2.imencode(".png", label, [cv2.IMWRITE_PNG_COMPRESSION, 6])
        if not ok:
            raise DataError(f"label {sample.label}: PNG encoding failed")
        lab = enc.tobytes()
    return img.tobytes(), lab, image.shape[0], image.shape[1]


class _ShardWriter:
    """Appends members to ``<split>-NNNNN.tar`` files, starting a new one past ``max_bytes``."""

    def __init__(self, out: Path, split: str, max_bytes: int) -> None:
        self.out, self.split, self.max_bytes = out, split, max_bytes
        self.tar: tarfile.TarFile | None = None
        self.names: list[str] = []

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        assert self.tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: shards are reproducible
        self.tar.addfile(info, io.BytesIO(data))
        # tar.offset is now past the data's 512-byte padding; the data starts that much earlier
        start = self.tar.offset - ((len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return start, len(data)

    def write(self, stem: str, image: bytes, ext: str, label: bytes | None) -> tuple[str, tuple, tuple | None]:
        if self.tar is None or (self.tar.offset > 0 and self.tar.offset + len(image) > self.max_bytes):
            self.close()
            self.names.append(f"{self.split}-{len(self.names):05d}.tar")
            self.tar = tarfile.open(self.out / self.names[-1], "w", format=tarfile.USTAR_FORMAT)
        img = self._add(f"{stem}{ext}", image)
        lab = self._add(f"{stem}.label.png", label) if label is not None else None
        return self.names[-1], img, lab

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def pack(
    samples_by_split: dict[str, Sequence[Sample]],
    info: DatasetInfo,
    out: str | Path,
    *,
    fmt: str = "jpeg",
    quality: int = 95,
    shard_size_mb: float = 16,
    source: str = "",
    overwrite: bool = False,
    workers: int = 4,
    log=print,
) -> dict[str, Any]:
    """Write the splits as tar shards plus ``index.json`` under ``out``; returns the index."""
    if fmt not in IMAGE_FORMATS:
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(IMAGE_FORMATS)}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality {quality}: expected 1..100")
    if shard_size_mb <= 0:
        raise DataError(f"--shard-size-mb {shard_size_mb}: must be positive")
    out = Path(out)
    index_path = out / INDEX_NAME
    if index_path.exists():
        if not overwrite:
            raise DataError(f"{index_path} already exists; pass --overwrite to replace the shards in {out}")
        for old in out.glob("*.tar"):
            old.unlink()
        index_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    ext = IMAGE_FORMATS[fmt]
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "dataset": info.to_dict(), "image_format": fmt,
                             "quality": quality if fmt == "jpeg" else None, "source": source,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "splits": {}, "shards": {}}
    for split, samples in samples_by_split.items():
        if not samples:
            raise DataError(f"split {split!r} is empty: nothing to pack")
        stems = [s.stem for s in samples]
        if len(set(stems)) != len(stems):
            dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
            raise DataError(f"split {split!r}: duplicate sample names {dup}; shard members need unique stems")
        writer = _ShardWriter(out, split, int(shard_size_mb * MiB))
        records = []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for lo in range(0, len(samples), 64):  # bounded chunks keep memory flat on big splits
                for s, (img, lab, h, w) in zip(samples[lo:lo + 64],
                                               pool.map(lambda s: _encode(s, fmt, quality), samples[lo:lo + 64])):
                    shard, img_loc, lab_loc = writer.write(s.stem, img, ext, lab)
                    records.append(ShardRecord(s.stem, shard, img_loc, lab_loc, h, w).to_dict())
        writer.close()
        sizes = {name: (out / name).stat().st_size for name in writer.names}
        index["splits"][split] = {"samples": records, "shards": writer.names}
        index["shards"].update(sizes)
        log(f"packed {split}: {len(records)} samples in {len(sizes)} shard(s), "
            f"{sum(sizes.values()) / MiB:.2f} MiB ({fmt}{f' q{quality}' if fmt == 'jpeg' else ''}), "
            f"{time.perf_counter() - t0:.1f} s")
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(index_path)
    log(f"total {sum(index['shards'].values()) / MiB:.2f} MiB in {out}")
    return index


# --- reading ---------------------------------------------------------------------------------------------------
class ShardReader:
    """Random access to one split of a shard folder; a sequence of :class:`ShardRecord`.

    ``load(i)`` returns ``(BGR uint8 image, uint8 train-id label or None)`` like ``load_sample``.
    Picklable (file descriptors are opened lazily per process), so it works in DataLoader workers.
    """

    def __init__(self, path: str | Path, split: str, validate: bool = True,
                 _index: dict | None = None, _records: list[ShardRecord] | None = None) -> None:
        path = Path(path)
        self.index_path = path if path.suffix == ".json" else path / INDEX_NAME
        self.root = self.index_path.parent
        self.split = split
        index = _index if _index is not None else self._read_index()
        self.index = index
        self.info = DatasetInfo.from_dict(index["dataset"])
        self.image_format = index["image_format"]
        if _records is not None:
            self.records = _records
        else:
            parts = UNION_SPLITS.get(split, (split,)) if split not in index["splits"] else (split,)
            missing = [p for p in parts if p not in index["splits"]]
            if missing:
                raise DataError(f"shard index {self.index_path} has no split {split!r} "
                                f"(splits: {', '.join(index['splits'])})")
            self.records = [ShardRecord.from_dict(r) for p in parts for r in index["splits"][p]["samples"]]
        if not self.records:
            raise DataError(f"shard index {self.index_path}: split {split!r} is empty")
        if validate:
            self._check_files()
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def _read_index(self) -> dict:
        try:
            index = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            raise DataError(f"shard index {self.index_path} does not exist (pack a dataset with "
                            "`ecmnet-core pack`)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"shard index {self.index_path} is not readable JSON: {e}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{self.index_path} is not an ecmnet shard index (format {FORMAT!r})")
        if index.get("version", 0) > VERSION:
            raise DataError(f"shard index {self.index_path} has version {index['version']}; this ecmnet reads "
                            f"up to {VERSION}")
        return index

    def _check_files(self) -> None:
        """Every shard the split uses exists with the size recorded at pack time (catches truncated copies)."""
        for name in sorted({r.shard for r in self.records}):
            p = self.root / name
            if not p.is_file():
                raise DataError(f"shard {p} (split {self.split!r}) does not exist")
            expected = self.index["shards"].get(name)
            if expected is not None and p.stat().st_size != expected:
                raise DataError(f"shard {p} is {p.stat().st_size} bytes but the index says {expected}: "
                                "truncated or replaced; re-pack")

    # sequence protocol
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int | slice) -> ShardRecord | ShardReader:
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        return self.records[i]

    def subset(self, indices: Sequence[int]) -> ShardReader:
        return ShardReader(self.index_path, self.split, validate=False, _index=self.index,
                           _records=[self.records[i] for i in indices])

    @property
    def stems(self) -> list[str]:
        return [r.stem for r in self.records]

    def stem(self, i: int) -> str:
        return self.records[i].stem

    def fingerprint(self) -> str:
        """Identifies the exact data (for stats caches)."""
        h = hashlib.sha256(str(self.index_path.resolve()).encode())
        h.update(json.dumps([r.to_dict() for r in self.records]).encode())
        h.update(json.dumps(self.index["shards"], sort_keys=True).encode())
        return h.hexdigest()

    # reading
    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: never share descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.root / shard, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"shard {self.root / shard} cannot be opened: {e}") from None
            self._fds[shard] = fd
        return fd

    def _read(self, shard: str, loc: tuple[int, int], what: str) -> bytes:
        offset, size = loc
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise DataError(f"shard {self.root / shard}: {what} is truncated ({len(data)} of {size} bytes)")
        return data

    def read_bytes(self, i: int) -> tuple[bytes, bytes | None]:
        """The encoded image and label bytes of sample ``i``."""
        r = self.records[i]
        lab = self._read(r.shard, r.label, f"label of {r.stem}") if r.label else None
        return self._read(r.shard, r.image, f"image of {r.stem}"), lab

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        r = self.records[i]
        img_bytes, lab_bytes = self.read_bytes(i)
        image = decode_image(img_bytes, f"{r.stem} in shard {self.root / r.shard}")
        label = decode_label(lab_bytes, f"{r.stem} in shard {self.root / r.shard}") if lab_bytes else None
        return image, label

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            try:
                self.close()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"ShardReader({self.index_path}, split={self.split!r}, {len(self)} samples, {self.image_format})"
