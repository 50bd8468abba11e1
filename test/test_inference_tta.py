"""Flip test-time augmentation: the averaged logits, mirror equivariance, and the option on every command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_camvid, make_checkpoint

from ecmnet_core.checkpoint import load_checkpoint
from ecmnet_core.cli import main
from ecmnet_core.data import Preprocess
from ecmnet_core.inference import InferenceConfig, Segmenter
from ecmnet_core.inference.pipeline import ModelRunner, tta_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tta")
    return make_camvid(tmp / "camvid", n_train=1, n_val=2), make_checkpoint(tmp / "camvid.pt")


def street(h: int = 48, w: int = 64) -> np.ndarray:
    """An asymmetric test image (so that flipping it changes it)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image[:, : w // 3] //= 3
    return image


def test_flip_logits_are_the_mean_of_the_image_and_its_mirror():
    calls = []

    def fake(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.clone())
        return batch[:, :2] * torch.arange(batch.shape[-1], dtype=batch.dtype)  # position-dependent output

    x = torch.randn(2, 3, 4, 5)
    out = tta_logits(fake, x, "flip")
    assert len(calls) == 2 and torch.equal(calls[1], x.flip(-1))
    expected = (fake(x) + fake(x.flip(-1)).flip(-1)) / 2
    assert torch.allclose(out, expected)
    assert torch.equal(tta_logits(fake, x, "none"), fake(x))


def test_a_mirrored_image_gets_mirrored_labels(data):
    _, ckpt = data
    seg = Segmenter(InferenceConfig(checkpoint=str(ckpt), device="cpu", tta="flip", input_size=(48, 64)))
    image = street()
    labels = seg.segment(image).labels
    mirrored = seg.segment(np.ascontiguousarray(image[:, ::-1])).labels
    assert np.array_equal(mirrored, labels[:, ::-1])
    plain = Segmenter(InferenceConfig(checkpoint=str(ckpt), device="cpu", input_size=(48, 64))).segment(image)
    assert not np.array_equal(plain.labels[:, ::-1], Segmenter(InferenceConfig(
        checkpoint=str(ckpt), device="cpu", input_size=(48, 64))).segment(np.ascontiguousarray(image[:, ::-1])).labels)


def test_segmenter_tta_matches_a_bare_model_runner(data):
    _, ckpt_path = data
    ckpt = load_checkpoint(ckpt_path)
    seg = Segmenter(InferenceConfig(checkpoint=str(ckpt_path), device="cpu", tta="flip", input_size=(32, 48),
                                    optimize=False, jit=False, channels_last=False))
    runner = ModelRunner(ckpt.build_model().eval(), Preprocess(ckpt.mean, ckpt.std, (32, 48)), tta="flip")
    image = street()
    batch = seg.preprocess(image)[None]
    assert torch.allclose(seg._runner.logits(batch), runner.logits(batch), atol=1e-5)
    with pytest.raises(ValueError, match="tta 'rot90' is not supported"):
        Segmenter(InferenceConfig(checkpoint=str(ckpt_path), device="cpu", tta="rot90"))


def test_eval_compare_tta_prints_both_figures(data, tmp_path, capsys):
    root, ckpt = data
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--workers", "0", "--no-progress",
                 "--compare-tta", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "-- tta none" in text and "-- tta flip" in text and "tta comparison: mIoU" in text
    summary = json.loads(out.read_text())
    assert summary["tta"] == "flip" and "miou" in summary["tta_none"]


def test_predict_takes_the_tta_option(data, tmp_path):
    root, ckpt = data
    out = tmp_path / "pred"
    assert main(["predict", str(root / "val"), "--checkpoint", str(ckpt), "--out", str(out),
                 "--tta", "flip"]) == 0
    assert len(list(out.rglob("*.png"))) >= 2
