"""Dataset discovery and up-front validation: CamVid, Cityscapes and folder layouts, list files, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import helpers
import numpy as np
import pytest

from ecmnet_core.data import (
    CAMVID,
    CITYSCAPES,
    CITYSCAPES_ID_TO_TRAINID,
    DataError,
    build_dataset,
    detect_kind,
    load_classes_yaml,
    load_sample,
    trainid_to_labelid,
)
from ecmnet_core.data.synthetic import make_camvid, make_cityscapes, make_folder

SHARED = Path(os.environ.get("ECMNET_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (set ECMNET_SHARED)")
    return path


# --- class tables ------------------------------------------------------------------------------------------
def test_class_tables():
    assert CAMVID.num_classes == 11 and CAMVID.ignore_index == 11 and CAMVID.palette[4] == (60, 40, 222)
    assert CITYSCAPES.num_classes == 19 and CITYSCAPES.ignore_index == 255
    assert CITYSCAPES.class_names[13] == "car" and CITYSCAPES.palette[13] == (0, 0, 142)
    # official labelId -> trainId pairs (cityscapesscripts labels.py), everything else ignore
    pairs = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert CITYSCAPES_ID_TO_TRAINID.shape == (256,) and CITYSCAPES_ID_TO_TRAINID.dtype == np.uint8
    for i in range(256):
        assert CITYSCAPES_ID_TO_TRAINID[i] == pairs.get(i, 255)


def test_labelid_export_round_trips():
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    train = CITYSCAPES_ID_TO_TRAINID[ids]
    back = trainid_to_labelid(train)
    valid = train != 255
    assert np.array_equal(back[valid], ids[valid])
    assert np.all(back[~valid] == 0)  # ignore exports as "unlabeled"
    # int64 predictions (argmax output) work too
    assert np.array_equal(trainid_to_labelid(np.arange(19, dtype=np.int64)), [7, 8, 11, 12, 13, 17, 19, 20, 21,
                                                                              22, 23, 24, 25, 26, 27, 28, 31, 32, 33])


# --- layouts ---------------------------------------------------------------------------------------------------
def test_camvid_layout_pairs_by_name_and_trainval(tmp_path):
    root = make_camvid(tmp_path / "camvid", {"train": 3, "val": 2})
    assert detect_kind(root) == "camvid"
    info, train = build_dataset("camvid", root, "train")
    assert info is CAMVID and [s.stem for s in train] == [f"0001TP_train{i:04d}" for i in range(3)]
    assert all(s.label == root / "trainannot" / f"{s.stem}.png" for s in train)
    _, both = build_dataset("camvid", root, "trainval")
    assert len(both) == 5
    image, label = load_sample(train[0])
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8 and label.shape == (64, 96)


def test_camvid_segnet_list_file_with_absolute_prefix(tmp_path):
    root = make_camvid(tmp_path / "camvid", {"train": 3})
    _, from_list = build_dataset("camvid", root, "train", list_file=root / "train.txt")
    _, from_dirs = build_dataset("camvid", root, "train")
    assert from_list == from_dirs


def test_letnet_relative_list_file(tmp_path):
    root = make_camvid(tmp_path / "camvid", {"train": 2})
    (root / "camvid_train_list.txt").write_text("train/0001TP_train0001.png trainannot/0001TP_train0001.png\n\n")
    _, samples = build_dataset("camvid", root, "train", list_file="camvid_train_list.txt")  # relative to root
    assert len(samples) == 1 and samples[0].image == root / "train" / "0001TP_train0001.png"


def test_cityscapes_layout_maps_labelids(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"train": 2, "val": 1})
    assert detect_kind(root) == "cityscapes"
    info, samples = build_dataset("cityscapes", root, "train")
    assert info is CITYSCAPES and len(samples) == 2
    assert samples[0].stem == "aachen_000000_000019" and samples[0].label_encoding == "cityscapes"
    raw = cv2.imread(str(samples[0].label), cv2.IMREAD_UNCHANGED)
    _, label = load_sample(samples[0])
    assert np.array_equal(label, CITYSCAPES_ID_TO_TRAINID[raw])
    assert label.max() == 255 and set(np.unique(label)) <= set(range(19)) | {255}
    assert len(build_dataset("cityscapes", root, "trainval")[1]) == 3


def test_folder_layout_and_classes_yaml(tmp_path):
    root = make_folder(tmp_path / "f", names=["a", "b", "c", "d"], n=3, ignore_index=200)
    assert detect_kind(root) == "folder"
    info, samples = build_dataset("folder", root, "all")
    assert info.name == "folder" and info.class_names == ["a", "b", "c", "d"] and info.ignore_index == 200
    assert len(samples) == 3 and samples[0].image.suffix == ".jpg" and samples[0].label.suffix == ".png"


def test_folder_without_palette_gets_distinct_colours(tmp_path):
    root = make_folder(tmp_path / "f", names=[f"c{i}" for i in range(30)], palette=False)
    info = load_classes_yaml(root / "classes.yaml")
    assert len(set(info.palette)) == 30 and info.ignore_index == 255


def test_real_camvid_list_files_match_folders():
    root = shared("camvid")
    info, train = build_dataset("camvid", root, "train", list_file=root / "train.txt")
    assert len(train) == 367
    assert train == build_dataset("camvid", root, "train", validate=False)[1]
    assert len(build_dataset("camvid", root, "val")[1]) == 101


def test_real_cityscapes_fixture_derives_train_ids_from_labelids():
    root = shared("cityscapes_fixture")
    info, samples = build_dataset("auto", root, "val")
    assert info is CITYSCAPES and [s.stem for s in samples] == ["frankfurt_000000_000294"]
    image, label = load_sample(samples[0])
    assert image.shape == (128, 256, 3)
    shipped = cv2.imread(str(samples[0].label).replace("_labelIds", "_labelTrainIds"), cv2.IMREAD_UNCHANGED)
    assert int((label != shipped).sum()) == 77  # the shipped labelTrainIds are known to be off on 77 pixels
    raw = cv2.imread(str(samples[0].label), cv2.IMREAD_UNCHANGED)
    valid = label != 255
    assert np.array_equal(trainid_to_labelid(label)[valid], raw[valid])


# --- bad input ------------------------------------------------------------------------------------------------
@pytest.fixture()
def camvid(tmp_path):
    return make_camvid(tmp_path / "camvid", {"train": 3, "val": 1})


def _error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        build_dataset(*args, **kwargs)
    return str(e.value)


def test_missing_label_is_named(camvid):
    (camvid / "trainannot" / "0001TP_train0001.png").unlink()
    msg = _error("camvid", camvid, "train")
    assert "0001TP_train0001.png does not exist" in msg and "1 of 3" in msg


def test_missing_image_from_list_is_named(camvid):
    (camvid / "train" / "0001TP_train0002.png").unlink()
    assert "train/0001TP_train0002.png does not exist" in _error("camvid", camvid, "train",
                                                                 list_file=camvid / "train.txt")


def test_unreadable_image_and_label(camvid):
    (camvid / "train" / "0001TP_train0000.png").write_bytes(b"not a png")
    (camvid / "trainannot" / "0001TP_train0001.png").write_bytes(b"\x89PNG broken")
    msg = _error("camvid", camvid, "train")
    assert "0001TP_train0000.png is not a readable image" in msg
    assert "0001TP_train0001.png cannot be decoded" in msg


def test_size_mismatch(camvid):
    cv2.imwrite(str(camvid / "trainannot" / "0001TP_train0000.png"), np.zeros((32, 96), np.uint8))
    assert "is 96x32 but image" in _error("camvid", camvid, "train")


def test_label_values_out_of_range(camvid):
    label = np.zeros((64, 96), np.uint8)
    label[0, 0], label[1, 1] = 12, 200
    cv2.imwrite(str(camvid / "trainannot" / "0001TP_train0000.png"), label)
    msg = _error("camvid", camvid, "train")
    assert "has values [12, 200]" in msg and "ignore id 11" in msg


def test_colour_label_rejected(camvid):
    cv2.imwrite(str(camvid / "trainannot" / "0001TP_train0000.png"), np.zeros((64, 96, 3), np.uint8))
    assert "expected a single-channel class-id PNG" in _error("camvid", camvid, "train")


def test_empty_and_unknown_split(camvid):
    (camvid / "test").mkdir()
    (camvid / "testannot").mkdir()
    assert "split 'test'" in _error("camvid", camvid, "test") and "empty" in _error("camvid", camvid, "test")
    msg = _error("camvid", camvid, "extra")
    assert "camvid split 'extra'" in msg and "'train'" in msg


def test_bad_kind_root_and_list_file(camvid, tmp_path):
    assert "unknown dataset kind 'voc'" in _error("voc", camvid, "train")
    assert "does not exist" in _error("camvid", tmp_path / "nope", "train")
    assert "list file" in _error("camvid", camvid, "train", list_file=tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a b c\n")
    assert "line 1: expected 'image [label]'" in _error("camvid", camvid, "train", list_file=tmp_path / "bad.txt")
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        detect_kind(tmp_path)


def test_bad_classes_yaml(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "classes.yaml").write_text("names: [a, b]\nignore_index: 1\n")
    assert "ignore_index 1 collides with class 'b'" in _error("folder", root, "x")
    (root / "classes.yaml").write_text("names: [a, b]\npalette: [[1, 2, 3]]\n")
    assert "1 palette colours for 2 classes" in _error("folder", root, "x")
    (root / "classes.yaml").write_text("classes: [a]\n")
    assert "expected a mapping with a 'names' list" in _error("folder", root, "x")


def test_cityscapes_invalid_labelid(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"val": 1})
    path = next((root / "gtFine").rglob("*_labelIds.png"))
    ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    ids[0, 0] = 40
    cv2.imwrite(str(path), ids)
    assert "values [40]: Cityscapes labelIds must be 0..33" in _error("cityscapes", root, "val")


def test_validate_false_defers_errors(camvid):
    (camvid / "trainannot" / "0001TP_train0001.png").unlink()
    _, samples = build_dataset("camvid", camvid, "train", validate=False)
    with pytest.raises(DataError, match="does not exist"):
        load_sample(samples[1])


def test_fixture_is_a_valid_camvid_dataset(tmp_path):
    """The tests' generated data (helpers.py) passes the data layer's own validation with the expected counts and
    classes."""
    root = helpers.make_camvid(tmp_path / "camvid", n_train=3, n_val=1)
    info, train = build_dataset("camvid", root, "train")
    _, val = build_dataset("auto", root, "val")
    assert info.name == "camvid" and len(train) == 3 and len(val) == 1
    ckpt = helpers.make_checkpoint(tmp_path / "c.pt", CITYSCAPES)
    assert ckpt.is_file()
