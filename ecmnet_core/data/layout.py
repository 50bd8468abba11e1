"""Names shared by the dataset builders and the shard reader: dataset kinds and split unions."""

from __future__ import annotations

#: Dataset layouts ``build_dataset`` understands.
KINDS = ("camvid", "cityscapes", "folder", "shards")
#: Split names that mean the union of two splits.
UNION_SPLITS = {"trainval": ("train", "val")}


def parse_split(split: str) -> tuple[str, tuple[str, ...], bool]:
    """``"train"`` -> ("train", (), False); a sequence filter on sample names after a colon:
    ``"train:0006R0"`` keeps the samples whose name starts with 0006R0, ``"train:-0006R0,0001TP"`` drops those
    starting with either (a cross-sequence check: one street held out of training). Returns (split, prefixes,
    exclude)."""
    name, sep, spec = split.partition(":")
    if not sep:
        return split, (), False
    exclude = spec.startswith("-")
    prefixes = tuple(p.strip() for p in spec.removeprefix("-").split(",") if p.strip())
    if not name or not prefixes:
        raise ValueError(f"split {split!r}: expected NAME:PREFIX[,PREFIX...] or NAME:-PREFIX[,...]")
    return name, prefixes, exclude


def keeps(stem: str, prefixes: tuple[str, ...], exclude: bool) -> bool:
    """Whether a sample named ``stem`` passes the filter of :func:`parse_split`."""
    if not prefixes:
        return True
    return stem.startswith(prefixes) != exclude


__all__ = ["KINDS", "UNION_SPLITS", "keeps", "parse_split"]
