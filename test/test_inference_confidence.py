"""Confidence, unknown masking and temperature calibration: the values against a softmax of the model's logits,
the mask, ECE and the reliability bins, fitting a known temperature back, and the temperature's way from
``calibrate`` through ``release`` into every Segmenter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_camvid, make_checkpoint

from ecmnet_core.calibrate import fit_temperature
from ecmnet_core.checkpoint import load_checkpoint, save_checkpoint
from ecmnet_core.cli import main
from ecmnet_core.data import UNLABELED
from ecmnet_core.inference import InferenceConfig, Segmenter
from ecmnet_core.inference.pipeline import confidence_image, top_probability
from ecmnet_core.metrics import CalibrationStats
from ecmnet_core.train.release import release_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conf")
    root = make_camvid(tmp / "camvid", n_train=1, n_val=3)
    ckpt = load_checkpoint(make_checkpoint(tmp / "plain.pt"))
    ckpt.metadata["temperature"] = 1.7
    return root, save_checkpoint(ckpt, tmp / "warm.pt")


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)


def test_confidence_is_the_tempered_softmax_of_the_models_logits(data):
    _, ckpt_path = data
    seg = Segmenter(InferenceConfig(checkpoint=str(ckpt_path), device="cpu", input_size=(32, 48), jit=False))
    assert seg.temperature == pytest.approx(1.7)
    img = image()
    result = seg.segment_batch([img], confidence=True)[0]
    model = load_checkpoint(ckpt_path).build_model().eval()
    with torch.no_grad():  # the network's 1/2-resolution logits, resampled to the image size in one step
        logits = model(seg.preprocess(img)[None], upsample=False)
    logits = F.interpolate(logits, size=img.shape[:2], mode="bilinear", align_corners=False)
    expected = (logits / 1.7).softmax(dim=1).amax(dim=1)[0].numpy()
    np.testing.assert_allclose(result.confidence, expected, atol=1e-4)
    np.testing.assert_array_equal(result.labels, logits.argmax(dim=1)[0].numpy())
    assert torch.allclose(top_probability(logits, 1.0), logits.softmax(dim=1).amax(dim=1), atol=1e-6)
    assert confidence_image(np.array([[0.0, 0.5, 1.0]])).tolist() == [[0, 128, 255]]


def test_min_confidence_marks_unknown_pixels_and_leaves_them_out_of_coverage(data):
    _, ckpt_path = data
    seg = Segmenter(InferenceConfig(checkpoint=str(ckpt_path), device="cpu", input_size=(32, 48)))
    img = image(1)
    full = seg.segment_batch([img], confidence=True)[0]
    assert full.unknown_share == 0.0 and not (full.labels == UNLABELED).any()
    threshold = float(np.quantile(full.confidence, 0.3))
    masked = seg.segment_batch([img], min_confidence=threshold)[0]
    below = full.confidence < threshold
    np.testing.assert_array_equal(masked.labels == UNLABELED, below)
    np.testing.assert_array_equal(masked.labels[~below], full.labels[~below])
    assert masked.unknown_share == pytest.approx(below.mean())
    kept = masked.labels[~below]
    np.testing.assert_allclose(masked.coverage, np.bincount(kept, minlength=11)[:11] / kept.size, atol=1e-6)
    with pytest.raises(ValueError, match="min_confidence must be in"):
        Segmenter(InferenceConfig(checkpoint=str(ckpt_path), device="cpu", min_confidence=1.5))


def test_ece_and_reliability_bins():
    stats = CalibrationStats(3, 255, bins=10, thresholds=(0.0, 0.5))
    conf = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    pred = torch.tensor([0, 1, 2, 0, 1, 1])
    target = torch.tensor([0, 1, 2, 2, 1, 255])  # 3 of 4 right at 0.95, 1 of 1 at 0.55 (the void pixel skipped)
    stats.update(conf, pred, target)
    assert stats.pixels == 5
    assert stats.ece() == pytest.approx(4 / 5 * abs(0.75 - 0.95) + 1 / 5 * abs(1.0 - 0.55))
    rows = stats.reliability()
    assert rows[9]["pixels"] == 4 and rows[9]["accuracy"] == pytest.approx(0.75)
    curve = stats.curve()
    assert curve[0]["kept"] == 1.0 and curve[1]["kept"] == pytest.approx(1.0)


def test_fitting_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40_000, 5, generator=gen) * 3
    targets = torch.multinomial((logits / 2.5).softmax(dim=1), 1, generator=gen).squeeze(1)
    assert fit_temperature(logits, targets) == pytest.approx(2.5, rel=0.05)


def test_calibrate_writes_the_temperature_that_release_and_segmenter_carry(data, tmp_path, capsys):
    root, _ = data
    plain = make_checkpoint(tmp_path / "plain.pt")
    out = tmp_path / "cal.pt"
    assert main(["calibrate", "--checkpoint", str(plain), "--data", str(root), "--out", str(out),
                 "--pixels-per-image", "500", "--reliability", str(tmp_path / "rel.png"),
                 "--json", str(tmp_path / "cal.json"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "temperature" in text and "ECE (15 bins" in text and (tmp_path / "rel.png").is_file()
    figures = json.loads((tmp_path / "cal.json").read_text())
    assert figures["nll_after"] <= figures["nll_before"] + 1e-9
    temperature = load_checkpoint(out).metadata["temperature"]
    assert temperature == pytest.approx(figures["temperature"])
    released = release_checkpoint(out, tmp_path / "released.pt")
    seg = Segmenter(InferenceConfig(checkpoint=str(released), device="cpu"))
    assert seg.temperature == pytest.approx(temperature) and seg.describe()["temperature"]


def test_eval_and_predict_take_the_confidence_options(data, tmp_path, capsys):
    root, ckpt = data
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--workers", "0", "--no-progress",
                 "--min-confidence", "0.3", "--confidence-curve", str(tmp_path / "curve.png"),
                 "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "min_confidence 0.3:" in text and "ECE (15 bins)" in text and (tmp_path / "curve.png").is_file()
    summary = json.loads((tmp_path / "e.json").read_text())
    assert 0.0 <= summary["confidence"]["kept_share"] <= 1.0 and summary["confidence"]["temperature"] == 1.7
    out = tmp_path / "pred"
    assert main(["predict", str(root / "val"), "--checkpoint", str(ckpt), "--out", str(out), "--save-confidence",
                 "--min-confidence", "0.3"]) == 0
    assert len(list(out.glob("*_confidence.png"))) == 3
