"""``ecmnet-core predict`` on images, a folder and a generated video: three PNGs per input, at input size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from helpers import make_camvid, make_checkpoint

from ecmnet_core.cli import main
from ecmnet_core.data import CAMVID
from ecmnet_core.inference import InferenceConfig, Segmenter
from ecmnet_core.inference.pipeline import segment_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    root = make_camvid(tmp / "camvid", n_train=1, n_val=2)
    video = tmp / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 40))
    assert writer.isOpened()
    for i in range(3):
        frame = np.zeros((40, 80, 3), np.uint8)
        frame[:, : 20 * (i + 1)] = (180, 130, 70)
        writer.write(frame)
    writer.release()
    return root / "val", video, make_checkpoint(tmp / "camvid.pt")


def test_images_folder_and_video(inputs, tmp_path, capsys):
    folder, video, ckpt = inputs
    out = tmp_path / "out"
    rc = main(["predict", str(folder), str(video), "--out", str(out), "--checkpoint", str(ckpt), "--device", "cpu",
               "--batch-size", "2", "--alpha", "0.4"])
    assert rc == 0
    assert "5 image(s) segmented" in capsys.readouterr().out
    stems = ["val_0000", "val_0001", "clip_000000", "clip_000001", "clip_000002"]
    expected = {f"{s}_{kind}.png" for s in stems for kind in ("labels", "color", "overlay")}
    assert {p.name for p in out.iterdir()} == expected

    seg = Segmenter(InferenceConfig(checkpoint=str(ckpt), device="cpu", warmup=0))
    image = cv2.imread(str(folder / "val_0001.png"))
    labels = cv2.imread(str(out / "val_0001_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint8 and labels.max() < CAMVID.num_classes
    # the same labels eval counts, the palette colours, and the overlay blend
    np.testing.assert_array_equal(labels, segment_images(seg, [image])[0])
    np.testing.assert_array_equal(cv2.imread(str(out / "val_0001_color.png")), seg.colorize(labels))
    np.testing.assert_array_equal(cv2.imread(str(out / "val_0001_overlay.png")), seg.overlay(image, labels, 0.4))
    frame_labels = cv2.imread(str(out / "clip_000002_labels.png"), cv2.IMREAD_UNCHANGED)
    assert frame_labels.shape == (40, 80)


def test_input_size_override_keeps_output_at_input_size(inputs, tmp_path):
    folder, _, ckpt = inputs
    out = tmp_path / "out"
    assert main(["predict", str(folder / "val_0000.png"), "--out", str(out), "--checkpoint", str(ckpt),
                 "--device", "cpu", "--input-size", "16", "32"]) == 0
    assert cv2.imread(str(out / "val_0000_labels.png"), cv2.IMREAD_UNCHANGED).shape == (48, 64)
    # the same stem twice gets a suffix instead of overwriting
    assert main(["predict", str(folder / "val_0000.png"), str(folder / "val_0000.png"), "--out", str(out),
                 "--checkpoint", str(ckpt), "--device", "cpu", "--native"]) == 0
    assert (out / "val_0000_2_labels.png").is_file()


def test_bad_inputs_are_reported(inputs, tmp_path, capsys):
    _, _, ckpt = inputs
    base = ["--out", str(tmp_path / "out"), "--checkpoint", str(ckpt), "--device", "cpu"]
    assert main(["predict", str(tmp_path / "nope.png"), *base]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["predict", str(tmp_path / "notes.txt"), *base]) == 2
    assert "unknown file type '.txt'" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(tmp_path / "broken.png"), *base]) == 2
    assert "broken.png cannot be decoded" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "notes.txt"), *base, "--alpha", "2"]) == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err


def test_a_truncated_image_listed_first_is_skipped_and_the_rest_segmented(inputs, tmp_path, capsys):
    folder, _, ckpt = inputs
    good = sorted(folder.glob("*.png"))[:2]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])  # header intact, data cut
    out = tmp_path / "out"
    assert main(["predict", str(truncated), *map(str, good), "--out", str(out), "--checkpoint", str(ckpt),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "truncated.png" in err and "1 file(s) could not be read" in err
    assert sorted(p.name for p in out.glob("*_labels.png")) == [f"{g.stem}_labels.png" for g in good]
