"""``ecmnet-core eval`` and ``evaluate_samples``: the numbers, the printed table, JSON, exports, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_camvid, make_checkpoint

from ecmnet_core.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from ecmnet_core.cli import main
from ecmnet_core.data import CITYSCAPES, CITYSCAPES_TRAINID_TO_ID, build_dataset, load_raw, normalize_image
from ecmnet_core.evaluate import evaluate_samples
from ecmnet_core.inference import InferenceConfig, Segmenter
from ecmnet_core.inference.pipeline import segment_images

SHARED = Path(os.environ.get("ECMNET_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    return make_camvid(tmp / "camvid", n_train=1, n_val=3), make_checkpoint(tmp / "camvid.pt")


def independent_confusion(ckpt_path: Path, root: Path) -> np.ndarray:
    """The confusion matrix computed by hand: resize to the checkpoint's input size, normalise, forward to the
    network's 1/2-resolution logits, upsample them bilinearly to the label size, argmax, count non-void pixels."""
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.build_model().eval()
    info, samples = build_dataset("camvid", root, "val")
    cm = np.zeros((11, 11), np.int64)
    for i in range(len(samples)):
        image, label = load_raw(samples, i)
        h, w = ckpt.input_size
        x = normalize_image(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR), ckpt.mean, ckpt.std)
        with torch.no_grad():
            logits = F.interpolate(model(x[None], upsample=False), size=label.shape, mode="bilinear",
                                   align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        valid = label != info.ignore_index
        cm += np.bincount(label[valid].astype(np.int64) * 11 + pred[valid], minlength=121).reshape(11, 11)
    return cm


def test_cli_prints_table_and_writes_json(data, tmp_path, capsys):
    root, ckpt = data
    out = tmp_path / "summary.json"
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--split", "val", "--device", "cpu",
               "--workers", "0", "--no-progress", "--json", str(out), "--save-color", str(tmp_path / "color")])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("Sky", "Bicyclist", "IoU %", "mIoU", "mIoU (fw)", "pixel acc", "input 32x48", "3 images"):
        assert needle in text, needle

    summary = json.loads(out.read_text())
    assert summary["images"] == 3 and summary["dataset"] == "camvid" and summary["split"] == "val"
    assert list(summary["per_class"]) == summary["class_names"] and len(summary["class_names"]) == 11
    cm = np.asarray(summary["confusion_matrix"])
    np.testing.assert_array_equal(cm, independent_confusion(ckpt, root))
    tp, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    assert summary["miou"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]))
    assert summary["miou_framework"] >= summary["miou"]  # TP = 0 classes are dropped from the framework mean
    assert summary["pixel_accuracy"] == pytest.approx(tp.sum() / cm.sum())
    colors = sorted((tmp_path / "color").glob("*.png"))
    assert [p.name for p in colors] == ["val_0000.png", "val_0001.png", "val_0002.png"]
    assert cv2.imread(str(colors[0])).shape == (48, 64, 3)


def test_segmenter_and_bare_model_give_identical_numbers(data):
    """Training-time validation (bare model) and eval/replay (Segmenter) share one prediction path."""
    root, ckpt_path = data
    info, samples = build_dataset("camvid", root, "val")
    seg = Segmenter(InferenceConfig(checkpoint=str(ckpt_path), device="cpu", channels_last=False, warmup=0))
    by_segmenter = evaluate_samples(seg, samples, info)
    ckpt = load_checkpoint(ckpt_path)
    by_model = evaluate_samples(ckpt.build_model(), samples, info, mean=ckpt.mean, std=ckpt.std,
                                input_size=tuple(ckpt.input_size))
    assert by_segmenter["confusion_matrix"] == by_model["confusion_matrix"]
    # segment_images (predict, replay) returns the labels that were counted
    images = [load_raw(samples, i)[0] for i in range(len(samples))]
    labels = [load_raw(samples, i)[1] for i in range(len(samples))]
    cm = np.zeros((11, 11), np.int64)
    for pred, label in zip(segment_images(seg, images), labels):
        assert pred.shape == label.shape and pred.dtype == np.uint8
        valid = label != 11
        cm += np.bincount(label[valid].astype(np.int64) * 11 + pred[valid], minlength=121).reshape(11, 11)
    np.testing.assert_array_equal(cm, by_segmenter["confusion_matrix"])


def test_class_count_mismatch_is_a_clear_error(data, tmp_path, capsys):
    root, _ = data
    ckpt = make_checkpoint(tmp_path / "city.pt", CITYSCAPES)
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "has 19 classes but dataset camvid" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(root), "--device", "cpu"])
    assert rc == 2 and "missing.pt does not exist" in capsys.readouterr().err


def test_default_checkpoint_is_used_without_checkpoint_argument(data, capsys):
    root, _ = data
    rc = main(["eval", "--data", str(root), "--device", "cpu", "--workers", "0", "--no-progress"])
    if DEFAULT_CHECKPOINT.is_file():
        assert rc == 0 and str(DEFAULT_CHECKPOINT) in capsys.readouterr().out
    else:
        assert rc == 2 and "packaged default model is missing" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "cityscapes_fixture").is_dir(), reason="shared/cityscapes_fixture not available")
def test_cityscapes_export_writes_official_label_ids(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "city.pt", CITYSCAPES, input_size=(64, 128))
    out = tmp_path / "export"
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(SHARED / "cityscapes_fixture"), "--split", "val",
               "--device", "cpu", "--workers", "0", "--no-progress", "--cityscapes-export", str(out)])
    assert rc == 0
    assert "road" in capsys.readouterr().out
    files = list(out.iterdir())
    assert [p.name for p in files] == ["frankfurt_000000_000294_gtFine_labelIds.png"]
    exported = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    assert exported.shape == (128, 256) and exported.dtype == np.uint8
    assert set(np.unique(exported)) <= set(CITYSCAPES_TRAINID_TO_ID.tolist())
    # the export is the evaluated prediction, mapped back from train ids
    info, samples = build_dataset("cityscapes", SHARED / "cityscapes_fixture", "val")
    seg = Segmenter(InferenceConfig(checkpoint=str(ckpt), device="cpu", warmup=0))
    train_ids = segment_images(seg, [load_raw(samples, 0)[0]])[0]
    np.testing.assert_array_equal(exported, CITYSCAPES_TRAINID_TO_ID[train_ids])


def test_a_truncated_png_is_skipped_and_named_and_the_rest_evaluated(tmp_path, capsys):
    """A PNG with an intact header and cut data passes the up-front check; evaluation skips it with a warning that
    names the file, counts it, and finishes with the figures of the other images (exit 0)."""
    root = make_camvid(tmp_path / "camvid", n_train=1, n_val=3)
    ckpt = make_checkpoint(tmp_path / "c.pt")
    victim = sorted((root / "val").glob("*.png"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--workers", "0", "--no-progress",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert victim.name in captured.err and "Traceback" not in captured.err
    assert "1 image(s) could not be decoded" in captured.out
    summary = json.loads(out.read_text())
    assert summary["images"] == 2 and len(summary["skipped"]) == 1 and victim.stem in summary["skipped"][0]["sample"]
