"""ConfusionMatrix against torchmetrics and by hand: standard and framework mIoU, merge, all-reduce."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassJaccardIndex

from ecmnet_core.data import CAMVID, CITYSCAPES
from ecmnet_core.metrics import ConfusionMatrix


def _batches(k: int, ignore: int, seed: int, n: int = 3, shape=(2, 24, 32)):
    """Random predictions/targets where class 1 never appears in either and class 2 is only predicted."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        target = rng.integers(0, k, shape)
        pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, k, shape))
        target[rng.random(shape) < 0.1] = ignore
        target[np.isin(target, (1, 2))] = 0
        pred[pred == 1] = 3
        yield torch.from_numpy(pred), torch.from_numpy(target)


@pytest.mark.parametrize("info", [CAMVID, CITYSCAPES], ids=["camvid-ignore11", "cityscapes-ignore255"])
def test_matches_torchmetrics_overall_and_per_class(info):
    k, ignore = info.num_classes, info.ignore_index
    # torchmetrics drops target == ignore_index before counting, for an ignore id outside [0, K) as well
    macro = MulticlassJaccardIndex(k, average="macro", ignore_index=ignore)
    per_class = MulticlassJaccardIndex(k, average="none", ignore_index=ignore)
    cm = ConfusionMatrix(k, ignore)
    for pred, target in _batches(k, ignore, seed=k):
        macro.update(pred, target)
        per_class.update(pred, target)
        cm.update(pred, target)
    assert abs(cm.miou() - macro.compute().item()) < 1e-6
    iou, ref = cm.iou(), per_class.compute().numpy()
    assert np.isnan(iou[1]) and ref[1] == 0  # absent everywhere: nan here, excluded from both means
    present = ~np.isnan(iou)
    np.testing.assert_allclose(iou[present], ref[present], atol=1e-6)
    assert iou[2] == 0  # predicted but never in gt: IoU 0, counts in the standard mean


def test_by_hand_and_framework_convention():
    cm = ConfusionMatrix(3, 255)
    target = np.array([0, 0, 0, 1, 1, 2, 255, 255])
    pred = np.array([0, 0, 1, 1, 0, 0, 2, 2])
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]  # rows = gt; ignored pixels skipped
    np.testing.assert_allclose(cm.iou(), [2 / 5, 1 / 3, 0.0])
    assert cm.miou() == pytest.approx((2 / 5 + 1 / 3 + 0) / 3)
    assert cm.miou_framework() == pytest.approx((2 / 5 + 1 / 3) / 2)  # class 2 has TP = 0: dropped
    assert cm.pixel_accuracy() == pytest.approx(3 / 6)


def test_numpy_and_torch_updates_agree_and_merge():
    a, b = ConfusionMatrix(11, 11), ConfusionMatrix(11, 11)
    for pred, target in _batches(11, 11, seed=1):
        a.update(pred, target)
        b.update(pred.numpy().astype(np.uint8), target.numpy().astype(np.uint8))
    assert np.array_equal(a.matrix, b.matrix) and a.matrix.dtype == np.int64
    halves = [ConfusionMatrix(11, 11), ConfusionMatrix(11, 11)]
    for i, (pred, target) in enumerate(_batches(11, 11, seed=1)):
        halves[i % 2].update(pred, target)
    assert np.array_equal(halves[0].merge(halves[1]).matrix, a.matrix)
    a.reset()
    assert a.matrix.sum() == 0 and np.isnan(a.miou()) and a.miou_framework() == 0.0


def test_bad_input():
    cm = ConfusionMatrix(3, 255)
    with pytest.raises(ValueError, match="pred shape"):
        cm.update(np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        cm.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        cm.update(torch.tensor([-1]), torch.tensor([0]))
    cm.update(np.array([7]), np.array([255]))  # a bad prediction on an ignored pixel does not matter
    with pytest.raises(ValueError, match="cannot merge"):
        cm.merge(ConfusionMatrix(4, 255))


def test_summary_is_json_and_table_prints():
    cm = ConfusionMatrix(3, 255)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    summary = json.loads(json.dumps(cm.summary(["a", "b", "c"])))
    assert summary["per_class"] == {"a": 0.5, "b": 0.5, "c": None}
    assert summary["miou"] == 0.5 and summary["pixels"] == 3
    table = cm.table(["a", "b", "c"])
    assert "mIoU" in table and "mIoU (fw)" in table and table.splitlines()[3].startswith("c")


def _rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(2, 255)
        cm.update(np.array([rank, 1]), np.array([0, 0]))  # rank 0: [[1, 1], ...]; rank 1: [[0, 2], ...]
        np.save(f"{out}{rank}.npy", cm.all_reduce().matrix)
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_across_ranks(tmp_path):
    cm = ConfusionMatrix(2, 255)
    cm.update(np.array([0, 1]), np.array([0, 0]))
    assert cm.all_reduce().matrix.tolist() == [[1, 1], [0, 0]]  # no process group: unchanged
    out = str(tmp_path / "rank")
    mp.start_processes(_rank, args=(f"file://{tmp_path / 'pg'}", out), nprocs=2, start_method="fork")
    for rank in range(2):
        assert np.load(f"{out}{rank}.npy").tolist() == [[1, 3], [0, 0]]
