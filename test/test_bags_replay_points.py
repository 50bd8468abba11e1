"""``make-bag --lidar`` writes camera_info and synthetic LiDAR clouds; offline replay paints them: with the
scene's own labels as predictions every point gets its expected class (shares per class exact, point accuracy
100 %); clouds without labels within the tolerance and bad clouds are counted."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import ecmnet_core.bags.replay as replay_module
from ecmnet_core.bags import BagError, BagFrame, BagReader, BagWriteConfig, write_image_bag
from ecmnet_core.bags.replay import replay_offline
from ecmnet_core.cli import main as cli
from ecmnet_core.data.classes import CAMVID, UNLABELED
from ecmnet_core.inference import InferenceConfig, Segmenter
from ecmnet_core.points.synthetic import driving_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W, N, FRAMES = 96, 128, 3000, 3
START = 1_700_000_000.0


@pytest.fixture(scope="module")
def scene_labels() -> np.ndarray:
    return driving_scene(width=W, height=H, points=10, distorted=False).labels


@pytest.fixture
def lidar_bag(tmp_path: Path, scene_labels: np.ndarray) -> Path:
    frames = [BagFrame(np.full((H, W, 3), 90, np.uint8), scene_labels, f"f{i}") for i in range(FRAMES)]
    config = BagWriteConfig(out=tmp_path / "bag", start_time=START, lidar_points=N,
                            custom={"class_names": list(CAMVID.class_names)})
    write_image_bag(frames, config)
    return config.out


def random_segmenter() -> Segmenter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warning
        return Segmenter(InferenceConfig(model="baseline", num_classes=11, input_size=(32, 48), warmup=0))


def test_bag_has_camera_info_clouds_and_metadata(lidar_bag: Path) -> None:
    with BagReader(lidar_bag) as reader:
        topics = {t.name: (t.msgtype, t.count) for t in reader.topics.values()}
        meta = reader.custom_data
    assert topics["/lidar/points"] == ("sensor_msgs/msg/PointCloud2", FRAMES)
    assert topics["/camera/camera_info"] == ("sensor_msgs/msg/CameraInfo", FRAMES)
    assert meta["points_topic"] == "/lidar/points" and meta["camera_info_topic"] == "/camera/camera_info"
    assert len(meta["lidar_to_camera"]) == 16


def test_replay_paints_every_point_with_its_class(lidar_bag: Path, scene_labels: np.ndarray, monkeypatch) -> None:
    # the predictions are the scene's drawn labels: painting, not the network, is under test
    monkeypatch.setattr(replay_module, "segment_images", lambda seg, images: [scene_labels.copy() for _ in images])
    with BagReader(lidar_bag) as reader:
        summary = replay_offline(reader, random_segmenter()).summary()["points"]
    expected = np.concatenate([driving_scene(width=W, height=H, points=N, seed=i, distorted=False,
                                             labels=scene_labels).expected for i in range(FRAMES)])
    painted = expected[expected != UNLABELED]
    counts = np.bincount(painted, minlength=11)
    assert summary["clouds"] == summary["clouds_painted"] == FRAMES and summary["clouds_unmatched"] == 0
    assert summary["points"] == len(expected) and summary["points_unpainted"] == int((expected == UNLABELED).sum())
    assert summary["points_painted"] == len(painted)
    shares = summary["painted_share_percent"]
    for i, name in enumerate(CAMVID.class_names):
        assert shares[name] == pytest.approx(counts[i] / len(painted) * 100.0)
    assert summary["point_accuracy"] == 1.0 and summary["points_compared_with_ground_truth"] == len(painted)


def test_replay_cli_prints_point_shares_and_can_turn_painting_off(lidar_bag: Path, tmp_path: Path, capsys) -> None:
    args = ["replay", "--offline", str(lidar_bag), "--model", "baseline", "--input-size", "32", "48",
            "--device", "cpu"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "painted points per class:" in out and f"{FRAMES}/{FRAMES} clouds painted" in out
    assert cli([*args, "--points-topic", ""]) == 0
    assert "painted points" not in capsys.readouterr().out


def test_without_the_transform_the_images_are_evaluated_and_the_points_skipped(lidar_bag: Path, monkeypatch) -> None:
    """A bag recorded on a robot (or whose metadata.yaml is lost) has no LiDAR -> camera transform: the images are
    still evaluated and the report says why the clouds were not painted; asking for the points by name, or giving a
    broken transform, is an error."""
    stored = BagReader.custom_data.fget
    monkeypatch.setattr(BagReader, "custom_data", property(
        lambda self: {k: v for k, v in stored(self).items() if k != "lidar_to_camera"}))
    with BagReader(lidar_bag) as reader:
        report = replay_offline(reader, random_segmenter())
        assert report.points is None and len([f for f in report.frames if f.status == "ok"]) == FRAMES
        assert any("points not painted" in n and "--lidar-to-camera" in n for n in report.notes)
        assert "note: points not painted" in report.format_text()
        with pytest.raises(BagError, match="--lidar-to-camera"):
            replay_offline(reader, random_segmenter(), points_topic="/lidar/points")
        with pytest.raises(BagError, match="last row"):
            replay_offline(reader, random_segmenter(), lidar_to_camera=[1.0] * 16)
