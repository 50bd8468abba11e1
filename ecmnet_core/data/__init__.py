"""Datasets (CamVid, Cityscapes, folder, packed shards), transforms, statistics."""

from ecmnet_core.data.builders import KINDS, build_dataset, detect_kind, read_list_file
from ecmnet_core.data.classes import (
    CAMVID,
    CITYSCAPES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_TRAINID_TO_ID,
    UNLABELED,
    DatasetInfo,
    bgr_lut,
    cityscapes_to_trainid,
    dataset_info,
    default_palette,
    load_classes_yaml,
    trainid_to_labelid,
)
from ecmnet_core.data.dataset import SegmentationDataset, load_raw
from ecmnet_core.data.errors import DataError
from ecmnet_core.data.io import Sample, load_sample, read_image, read_label, write_image
from ecmnet_core.data.stats import DatasetStats, compute_stats, enet_weights
from ecmnet_core.data.transforms import EvalTransform, Preprocess, TrainTransform, normalize_image
from ecmnet_core.data.validate import validate_samples

__all__ = [
    "CAMVID", "CITYSCAPES", "CITYSCAPES_ID_TO_TRAINID", "CITYSCAPES_TRAINID_TO_ID", "KINDS", "UNLABELED",
    "DataError", "DatasetInfo", "DatasetStats", "EvalTransform", "Preprocess", "Sample", "SegmentationDataset",
    "TrainTransform",
    "bgr_lut", "build_dataset", "cityscapes_to_trainid", "compute_stats", "dataset_info", "default_palette",
    "detect_kind", "enet_weights", "load_classes_yaml", "load_raw", "load_sample", "normalize_image", "read_image",
    "read_label", "read_list_file", "trainid_to_labelid", "validate_samples", "write_image",
]


def __getattr__(name: str):
    # ShardReader lives in shards.py, which also holds the `pack` CLI; import it lazily
    if name == "ShardReader":
        from ecmnet_core.data.shards import ShardReader

        return ShardReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
