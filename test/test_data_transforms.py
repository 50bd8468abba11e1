"""Normalisation and the train / eval transforms (scale, pad, crop, flip, jitter) on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecmnet_core.data import CAMVID, EvalTransform, SegmentationDataset, TrainTransform, normalize_image
from ecmnet_core.data.synthetic import make_camvid

MEAN, STD = [10.0, 20.0, 30.0], [2.0, 4.0, 5.0]


def test_normalize_image_is_bgr_minus_mean_over_std_flipped_to_rgb():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize_image(image, MEAN, STD)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32 and x.is_contiguous()
    for rgb, bgr in ((0, 2), (1, 1), (2, 0)):
        expected = (image[:, :, bgr].astype(np.float32) - MEAN[bgr]) / STD[bgr]
        np.testing.assert_allclose(x[rgb].numpy(), expected, rtol=1e-6)


def test_inference_preprocessing_hands_the_engine_channels_last_memory_with_the_same_values():
    """Preprocess (the Segmenter, eval, predict, replay) returns (3, H, W) in (H, W, 3) memory, bit for bit the
    contiguous normalisation, and a batch of such images stacks to a channels-last tensor (no transposing copies)."""
    from ecmnet_core.data import Preprocess
    from ecmnet_core.inference.pipeline import stack_images

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (6, 9, 3), dtype=np.uint8) for _ in range(2)]
    prep = Preprocess(MEAN, STD)
    views = [prep(im) for im in images]
    for view, image in zip(views, images):
        assert view.shape == (3, 6, 9) and not view.is_contiguous()
        assert view[None].is_contiguous(memory_format=torch.channels_last)
        reference = (image.astype(np.float32) - np.float32(MEAN)) * (1.0 / np.float32(STD))
        assert torch.equal(view, torch.from_numpy(np.ascontiguousarray(reference[:, :, ::-1].transpose(2, 0, 1))))
    batch = stack_images(views)
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch, torch.stack(views))
    assert torch.equal(stack_images([v.contiguous() for v in views]), batch)  # plain (3, H, W) tensors stack too


def test_normalize_image_mono_is_replicated_and_bad_input_rejected():
    mono = np.arange(12, dtype=np.uint8).reshape(3, 4)
    x = normalize_image(mono, MEAN, STD)
    np.testing.assert_allclose(x[0].numpy(), (mono - 30.0) / 5.0)  # R channel uses the third (R) statistic
    with pytest.raises(ValueError, match="HxWx3"):
        normalize_image(np.zeros((3, 4, 4), np.uint8), MEAN, STD)
    with pytest.raises(ValueError, match="std_bgr must be positive"):
        normalize_image(mono, MEAN, [1, 0, 1])


def _coded_pair(h=40, w=60):
    """An image whose blue channel is 10*label, so any misalignment between image and label is visible."""
    rng = np.random.default_rng(1)
    label = rng.integers(0, 11, (h, w)).astype(np.uint8)
    label[:, :3] = 11
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :, 0] = label * 10
    image[:, :, 1] = np.arange(w, dtype=np.uint8)[None] * 4  # encodes x, to see flips
    return image, label


def test_train_transform_keeps_image_and_label_aligned():
    image, label = _coded_pair()
    t = TrainTransform((32, 48), [0, 0, 0], [1, 1, 1], ignore_index=11, scale_range=(1.0, 1.0))
    flipped = 0
    for seed in range(20):
        x, y = t(image, label, np.random.default_rng(seed))
        assert x.shape == (3, 32, 48) and y.shape == (32, 48) and y.dtype == torch.int64
        assert torch.equal(x[2], y.float() * 10)  # blue (BGR index 0) is RGB index 2
        flipped += bool(x[1, 0, 0] > x[1, 0, -1])
    assert 0 < flipped < 20  # horizontal flip happens, sometimes


def test_train_transform_pads_with_zero_and_ignore():
    image, label = _coded_pair(20, 30)
    image[:] = 255
    label[:] = 3
    t = TrainTransform((40, 50), [0, 0, 0], [1, 1, 1], ignore_index=11, scale_range=(1.0, 1.0), flip=False)
    x, y = t(image, label, np.random.default_rng(0))
    assert x.shape == (3, 40, 50)
    assert torch.all(y[:20, :30] == 3) and torch.all(y[20:] == 11) and torch.all(y[:, 30:] == 11)
    assert torch.all(x[:, :20, :30] == 255) and torch.all(x[:, 20:] == 0)


def test_train_transform_scales_from_the_framework_set_times_base_scale():
    image, label = _coded_pair(40, 60)
    # a crop larger than every scaled image: the unpadded rows reveal the scaled height
    t = TrainTransform((100, 140), [0, 0, 0], [1, 1, 1], 11, base_scale=0.5, flip=False)
    assert np.allclose(t.scales, [0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    seen = set()
    for seed in range(40):
        _, y = t(image, label, np.random.default_rng(seed))
        seen.add(int((y != 11).any(1).sum()))
    assert seen == {int(round(40 * 0.5 * f)) for f in (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)}


def test_train_transform_nearest_label_and_determinism():
    image, label = _coded_pair()
    t = TrainTransform((24, 24), MEAN, STD, 11, jitter=True)
    a = t(image, label, np.random.default_rng(7))
    b = t(image, label, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(a[1].unique().tolist()) <= set(range(12))  # nearest resize never invents label values


def test_eval_transform_scales_image_only():
    image, label = _coded_pair(40, 60)
    x, y = EvalTransform(MEAN, STD)(image, label)
    assert x.shape == (3, 40, 60) and torch.equal(y, torch.from_numpy(label).long())
    x, y = EvalTransform(MEAN, STD, scale=0.5)(image, label)
    assert x.shape == (3, 20, 30) and y.shape == (40, 60)


def test_segmentation_dataset_seeded_augmentation(tmp_path):
    root = make_camvid(tmp_path / "c", {"train": 3})
    from ecmnet_core.data import build_dataset

    info, samples = build_dataset("camvid", root, "train")
    t = TrainTransform((32, 32), MEAN, STD, CAMVID.ignore_index)
    ds = SegmentationDataset(samples, t, info, seed=5)
    x0, y0 = ds[1]
    assert torch.equal(ds[1][0], x0)  # same (seed, epoch, index) -> same crop
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], x0)
    assert len(ds) == 3 and ds.stem(1) == samples[1].stem
    with pytest.raises(IndexError):
        ds[3]
