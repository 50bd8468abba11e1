"""Packed tar shards: lossless round trip, same batches as folders, JPEG size, CLI, damaged shards."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ecmnet_core import cli
from ecmnet_core.data import (
    CITYSCAPES,
    DataError,
    SegmentationDataset,
    TrainTransform,
    build_dataset,
    compute_stats,
    detect_kind,
    load_sample,
)
from ecmnet_core.data.shards import ShardReader, pack
from ecmnet_core.data.synthetic import make_camvid, make_cityscapes

SHARED = Path(os.environ.get("ECMNET_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture()
def camvid(tmp_path):
    return make_camvid(tmp_path / "camvid", {"train": 5, "val": 2})


def _pack(root, out, splits=("train",), **kw):
    info = None
    by_split = {}
    for s in splits:
        info, by_split[s] = build_dataset("auto", root, s)
    return pack(by_split, info, out, log=lambda *_: None, **kw)


def test_png_shards_decode_byte_identical(camvid, tmp_path):
    _pack(camvid, tmp_path / "sh", ("train", "val"), fmt="png", shard_size_mb=0.03)  # tiny: several shards
    assert detect_kind(tmp_path / "sh") == "shards"
    info, reader = build_dataset("shards", tmp_path / "sh", "train")
    assert isinstance(reader, ShardReader) and info.name == "camvid" and len(reader) == 5
    assert len({r.shard for r in reader.records}) > 1
    _, samples = build_dataset("camvid", camvid, "train")
    assert reader.stems == [s.stem for s in samples]
    for i, s in enumerate(samples):
        image, label = reader.load(i)
        ref_image, ref_label = load_sample(s)
        assert np.array_equal(image, ref_image) and np.array_equal(label, ref_label)
    assert len(build_dataset("shards", tmp_path / "sh" / "index.json", "trainval")[1]) == 7
    # shards are ordinary tars holding <stem>.png and <stem>.label.png
    with tarfile.open(tmp_path / "sh" / "train-00000.tar") as tar:
        assert tar.getnames()[:2] == [f"{samples[0].stem}.png", f"{samples[0].stem}.label.png"]


def test_same_batches_from_shards_and_folders(camvid, tmp_path):
    _pack(camvid, tmp_path / "sh", fmt="png")
    batches = []
    for kind, root in (("camvid", camvid), ("shards", tmp_path / "sh")):
        info, samples = build_dataset(kind, root, "train")
        ds = SegmentationDataset(samples, TrainTransform((32, 48), [100, 100, 100], [60, 60, 60], 11), info, seed=3)
        loader = DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0),
                            num_workers=1 if kind == "shards" else 0)  # a worker process reads the shards
        batches.append(list(loader))
    for (xa, ya), (xb, yb) in zip(*batches, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_jpeg_shards_are_close_and_stats_work(camvid, tmp_path):
    for path in (camvid / "train").iterdir():  # smooth photo-like content (JPEG of white noise is poor by design)
        cv2.imwrite(str(path), cv2.GaussianBlur(cv2.imread(str(path)), (7, 7), 3))
    _pack(camvid, tmp_path / "sh", fmt="jpeg", quality=90)
    info, reader = build_dataset("shards", tmp_path / "sh", "train")
    assert reader.image_format == "jpeg" and (reader.root / reader[0].shard).suffix == ".tar"
    _, samples = build_dataset("camvid", camvid, "train")
    image, label = reader.load(0)
    ref_image, ref_label = load_sample(samples[0])
    assert np.array_equal(label, ref_label)  # labels are always lossless
    assert np.abs(image.astype(int) - ref_image).mean() < 2
    sa, sb = compute_stats(reader, info), compute_stats(samples, info)
    assert sa.class_weights == sb.class_weights
    assert len(reader[1:3]) == 2 and reader[1:3].stems == reader.stems[1:3]


def test_cityscapes_shards_store_train_ids(tmp_path):
    root = make_cityscapes(tmp_path / "cs", {"val": 2})
    _pack(root, tmp_path / "sh", ("val",), fmt="png")
    info, reader = build_dataset("shards", tmp_path / "sh", "val")
    assert info == CITYSCAPES
    _, samples = build_dataset("cityscapes", root, "val")
    assert np.array_equal(reader.load(1)[1], load_sample(samples[1])[1])


def test_cli_pack(camvid, tmp_path, capsys):
    out = tmp_path / "sh"
    args = ["pack", "--data", str(camvid), "--split", "train", "--split", "val", "--out", str(out),
            "--format", "jpeg", "--quality", "90"]
    assert cli.main(args) == 0
    assert "packed train: 5 samples" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train-00000.tar", "val-00000.tar"]
    assert cli.main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0
    assert cli.main(["pack", "--data", str(tmp_path / "none"), "--split", "train", "--out", str(out)]) == 2
    assert f"dataset root {tmp_path / 'none'} does not exist" in capsys.readouterr().err


def test_damaged_or_missing_shards(camvid, tmp_path):
    out = tmp_path / "sh"
    _pack(camvid, out)
    with pytest.raises(DataError, match="has no split 'test'"):
        build_dataset("shards", out, "test")
    shard = out / "train-00000.tar"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(DataError, match="train-00000.tar is .* bytes but the index says"):
        build_dataset("shards", out, "train")
    shard.unlink()
    with pytest.raises(DataError, match="train-00000.tar .*does not exist"):
        build_dataset("shards", out, "train")
    (out / "index.json").write_text("{}")
    with pytest.raises(DataError, match="not an ecmnet shard index"):
        build_dataset("shards", out, "train")
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("shards", tmp_path / "nowhere" / "index.json", "train")


def test_real_camvid_jpeg_q90_under_64_mib(tmp_path):
    root = SHARED / "camvid"
    if not root.is_dir():
        pytest.skip(f"shared data {root} is absent (set ECMNET_SHARED)")
    index = _pack(root, tmp_path / "sh", ("train", "val"), fmt="jpeg", quality=90)
    total = sum(index["shards"].values())
    print(f"CamVid train+val JPEG q90 shards: {total / 2**20:.2f} MiB")
    assert total < 64 * 2**20
    assert [len(index["splits"][s]["samples"]) for s in ("train", "val")] == [367, 101]
