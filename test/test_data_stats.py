"""Dataset statistics: per-image BGR mean/std averaged over images, ENet class weights, JSON cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ecmnet_core.data import CAMVID, build_dataset, compute_stats, enet_weights
from ecmnet_core.data.synthetic import make_camvid

SHARED = Path(os.environ.get("ECMNET_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def test_stats_match_direct_computation(tmp_path):
    root = make_camvid(tmp_path / "c", {"train": 3})
    info, samples = build_dataset("camvid", root, "train")
    stats = compute_stats(samples, info)
    images = [cv2.imread(str(s.image)).astype(np.float64) for s in samples]
    labels = np.concatenate([cv2.imread(str(s.label), cv2.IMREAD_UNCHANGED).ravel() for s in samples])
    np.testing.assert_allclose(stats.mean_bgr, np.mean([im.mean(axis=(0, 1)) for im in images], axis=0))
    np.testing.assert_allclose(stats.std_bgr, np.mean([im.std(axis=(0, 1)) for im in images], axis=0))
    valid = labels[labels < 11]  # void (11) never enters the frequency
    freq = np.bincount(valid, minlength=11) / valid.size
    np.testing.assert_allclose(stats.class_frequency, freq)
    np.testing.assert_allclose(stats.class_weights, 1 / np.log(1.10 + freq))
    assert stats.num_images == 3


def test_enet_weights_formula():
    np.testing.assert_allclose(enet_weights([0.0, 1.0]), [1 / np.log(1.1), 1 / np.log(2.1)])


def test_cache_reused_and_invalidated(tmp_path):
    root = make_camvid(tmp_path / "c", {"train": 2})
    info, samples = build_dataset("camvid", root, "train")
    cache = tmp_path / "cache" / "stats.json"
    first = compute_stats(samples, info, cache=cache)
    assert cache.is_file()
    data = cache.read_text().replace(str(first.mean_bgr[0]), "1234.5")
    cache.write_text(data)
    assert compute_stats(samples, info, cache=cache).mean_bgr[0] == 1234.5  # served from the cache
    # editing a file changes the key: recomputed
    img = cv2.imread(str(samples[0].image))
    time.sleep(0.01)
    cv2.imwrite(str(samples[0].image), 255 - img)
    assert compute_stats(samples, info, cache=cache).mean_bgr[0] != 1234.5


def test_real_camvid_trainval_matches_framework_constants():
    root = SHARED / "camvid"
    if not root.is_dir():
        pytest.skip(f"shared data {root} is absent (set ECMNET_SHARED)")
    info, samples = build_dataset("camvid", root, "trainval", validate=False)
    assert info is CAMVID and len(samples) == 468
    stats = compute_stats(samples, info)
    np.testing.assert_allclose(stats.mean_bgr, [105.658, 103.330, 99.625], atol=5e-4)
    np.testing.assert_allclose(stats.std_bgr, [71.116, 71.676, 67.876], atol=5e-4)
    np.testing.assert_allclose(stats.class_weights,
                               [4.367, 3.357, 9.645, 2.841, 6.901, 5.124, 9.458, 9.109, 7.087, 9.868, 9.809],
                               atol=5e-4)
