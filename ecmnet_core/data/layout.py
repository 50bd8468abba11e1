"""Names shared by the dataset builders and the shard reader: dataset kinds and split unions."""

from __future__ import annotations

#: Dataset layouts ``build_dataset`` understands.
KINDS = ("camvid", "cityscapes", "folder", "shards")
#: Split names that mean the union of two splits.
UNION_SPLITS = {"trainval": ("train", "val")}

__all__ = ["KINDS", "UNION_SPLITS"]
