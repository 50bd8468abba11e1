"""Bag writing and reading: both storage plugins round-trip exactly, JPEG mode, the make-bag CLI, and bad bags
(missing topic, wrong message type, truncated / corrupt storage, empty bag) each give a clear BagError."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ecmnet_core.bags import BagError, BagFrame, BagReader, BagWriteConfig, write_image_bag
from ecmnet_core.bags.reader import decode_image_message, decode_label_message
from ecmnet_core.cli import main as cli

START = 1_700_000_000.0
RATE = 15.0


def make_frames(n: int = 6, h: int = 64, w: int = 96, seed: int = 0) -> list[BagFrame]:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        label = rng.integers(0, 4, (h, w), dtype=np.uint8)
        label[:4] = 255  # an unlabeled band
        frames.append(BagFrame(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), label, f"frame_{i:02d}"))
    return frames


def read_all(path: Path) -> dict[str, list[tuple[int, int, str, np.ndarray]]]:
    """topic -> [(receive time, header stamp, frame_id, decoded array)] in bag order."""
    out: dict[str, list] = {}
    with BagReader(path) as reader:
        for msg in reader.messages():
            decode = decode_label_message if msg.topic.endswith("labels") else decode_image_message
            out.setdefault(msg.topic, []).append((msg.t_ns, msg.stamp_ns, msg.frame_id,
                                                  np.array(decode(msg.msg, msg.msgtype))))
    return out


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_round_trip_is_exact(tmp_path: Path, storage: str) -> None:
    """Images (bgr8) and labels (mono8) come back bit-identical, stamps 1/rate apart, same header on both topics."""
    frames = make_frames()
    summary = write_image_bag(frames, BagWriteConfig(out=tmp_path / "bag", storage=storage, rate=RATE,
                                                     start_time=START, custom={"dataset": "synthetic"}))
    assert (summary.frames, summary.labels, summary.storage) == (6, 6, storage)
    assert summary.duration_s == pytest.approx(5 / RATE)
    data = read_all(tmp_path / "bag")
    assert set(data) == {"/camera/image_raw", "/camera/labels"}
    for i, (frame, (t, stamp, fid, image), (lt, lstamp, lfid, label)) in enumerate(
            zip(frames, data["/camera/image_raw"], data["/camera/labels"])):
        expected = int(START * 1e9) + round(i * 1e9 / RATE)
        assert t == stamp == lt == lstamp == expected
        assert fid == lfid == "camera"
        np.testing.assert_array_equal(image, frame.image)
        np.testing.assert_array_equal(label, frame.label)
    with BagReader(tmp_path / "bag") as reader:
        assert reader.storage == storage
        meta = reader.custom_data
        assert meta["frames"] == [f.name for f in frames]
        assert meta["dataset"] == "synthetic" and meta["ignore_index"] == 255
        assert meta["image_topic"] == "/camera/image_raw" and meta["label_topic"] == "/camera/labels"
    # no staging leftovers next to the bag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag"]


def test_sqlite_and_mcap_bags_hold_the_same_messages(tmp_path: Path) -> None:
    frames = make_frames(4)
    for storage in ("sqlite3", "mcap"):
        write_image_bag(frames, BagWriteConfig(out=tmp_path / storage, storage=storage, start_time=START))
    a, b = read_all(tmp_path / "sqlite3"), read_all(tmp_path / "mcap")
    assert a.keys() == b.keys()
    for topic in a:
        for x, y in zip(a[topic], b[topic], strict=True):
            assert x[:3] == y[:3]
            np.testing.assert_array_equal(x[3], y[3])


def test_compressed_bag_writes_jpeg_on_compressed_topic(tmp_path: Path) -> None:
    frames = make_frames(3)
    frames = [BagFrame(cv2.GaussianBlur(f.image, (9, 9), 3), f.label, f.name) for f in frames]  # JPEG-friendly
    summary = write_image_bag(frames, BagWriteConfig(out=tmp_path / "bag", compressed=True, jpeg_quality=95,
                                                     storage="mcap", start_time=START))
    assert summary.image_topic == "/camera/image_raw/compressed"
    with BagReader(tmp_path / "bag") as reader:
        assert reader.topics["/camera/image_raw/compressed"].msgtype == "sensor_msgs/msg/CompressedImage"
        image_topic, label_topic = reader.resolve_topics(None, None)
        assert (image_topic.name, label_topic.name) == ("/camera/image_raw/compressed", "/camera/labels")
    data = read_all(tmp_path / "bag")
    for frame, (_, _, _, image), (_, _, _, label) in zip(frames, data["/camera/image_raw/compressed"],
                                                         data["/camera/labels"]):
        assert image.shape == frame.image.shape
        assert np.abs(image.astype(int) - frame.image).mean() < 3.0  # lossy, but close
        np.testing.assert_array_equal(label, frame.label)  # labels are never JPEG-compressed


def test_make_bag_cli_from_image_folder(tmp_path: Path) -> None:
    frames = make_frames(3)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for f in frames:
        cv2.imwrite(str(tmp_path / "img" / f"{f.name}.png"), f.image)
        cv2.imwrite(str(tmp_path / "lab" / f"{f.name}.png"), f.label)
    out = tmp_path / "bag"
    assert cli(["make-bag", "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--out", str(out),
                "--storage", "mcap", "--rate", "10", "--topic", "/cam/image", "--label-topic", "/cam/gt",
                "--frame-id", "cam0", "--start-time", str(START)]) == 0
    data = read_all(out)
    assert [s for _, s, _, _ in data["/cam/image"]] == [int(START * 1e9) + i * 100_000_000 for i in range(3)]
    assert {fid for _, _, fid, _ in data["/cam/gt"]} == {"cam0"}
    for f, (_, _, _, image) in zip(frames, data["/cam/image"]):
        np.testing.assert_array_equal(image, f.image)
    # an existing output is refused unless --overwrite
    with pytest.raises(SystemExit, match="already exists"):
        cli(["make-bag", "--images", str(tmp_path / "img"), "--out", str(out)])
    assert cli(["make-bag", "--images", str(tmp_path / "img"), "--out", str(out), "--overwrite", "--limit", "2"]) == 0
    with BagReader(out) as reader:
        assert reader.topics["/camera/image_raw"].count == 2 and "/camera/labels" not in reader.topics


def test_make_bag_console_script_strips_ros_args(tmp_path: Path) -> None:
    """``ros2 run ecmnet_ros make_bag ... --ros-args ...``: ROS arguments are ignored; --distro picks the format."""
    from ecmnet_ros.make_bag import main

    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.full((8, 8, 3), 7, np.uint8))
    assert main(["--images", str(tmp_path / "img"), "--out", str(tmp_path / "bag"), "--distro", "humble",
                 "--ros-args", "-p", "use_sim_time:=true"]) == 0
    assert "version: 8" in (tmp_path / "bag" / "metadata.yaml").read_text()
    (_, _, _, image), = read_all(tmp_path / "bag")["/camera/image_raw"]
    assert image.shape == (8, 8, 3) and (image == 7).all()


def test_make_bag_cli_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="exactly one source"):
        cli(["make-bag", "--out", str(tmp_path / "x")])
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="--rate must be > 0"):
        cli(["make-bag", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "x"), "--rate", "0"])
    with pytest.raises(SystemExit, match="--topic 'camera' must be an absolute"):
        cli(["make-bag", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "x"), "--topic", "camera"])
    with pytest.raises(SystemExit, match="contains no images"):
        cli(["make-bag", "--images", str(tmp_path), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_make_bag_from_camvid_maps_void_to_255(shared_dir: Path, tmp_path: Path) -> None:
    camvid = shared_dir / "camvid"
    if not (camvid / "val").is_dir():
        pytest.skip(f"CamVid not found under {camvid}")
    out = tmp_path / "camvid"
    assert cli(["make-bag", "--data", str(camvid), "--split", "val", "--limit", "2", "--out", str(out),
                "--start-time", str(START)]) == 0
    data = read_all(out)
    assert len(data["/camera/image_raw"]) == 2
    raw = cv2.imread(str(camvid / "valannot" / "0016E5_07959.png"), cv2.IMREAD_UNCHANGED)
    label = data["/camera/labels"][0][3]
    np.testing.assert_array_equal(label, np.where(raw == 11, 255, raw))
    with BagReader(out) as reader:
        assert reader.custom_data["class_names"][0] == "Sky" and reader.custom_data["frames"][0] == "0016E5_07959"


# ------------------------------------------------------------------------------------------------ bad bags
def _small_bag(tmp_path: Path, storage: str = "sqlite3", name: str = "bag") -> Path:
    write_image_bag(make_frames(3), BagWriteConfig(out=tmp_path / name, storage=storage, start_time=START))
    return tmp_path / name


def test_missing_topic_lists_existing_topics(tmp_path: Path) -> None:
    with BagReader(_small_bag(tmp_path)) as reader:
        with pytest.raises(BagError, match=r"'/front/image' does not exist; topics in the bag: /camera/image_raw "
                                           r"\[sensor_msgs/msg/Image, 3 msgs\]; /camera/labels"):
            reader.resolve_topics("/front/image", None)
        with pytest.raises(BagError, match="label topic '/gt' does not exist"):
            reader.resolve_topics(None, "/gt")


def test_unsupported_message_type(tmp_path: Path) -> None:
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    string = ts.types["std_msgs/msg/String"]
    with Writer(tmp_path / "bag", version=9) as writer:
        conn = writer.add_connection("/camera/image_raw", "std_msgs/msg/String", typestore=ts)
        writer.write(conn, 1, ts.serialize_cdr(string(data="hi"), "std_msgs/msg/String"))
    with BagReader(tmp_path / "bag") as reader:
        with pytest.raises(BagError, match="unsupported message type 'std_msgs/msg/String'"):
            reader.resolve_topics("/camera/image_raw", "")
        with pytest.raises(BagError, match="no sensor_msgs/Image or CompressedImage topic"):
            reader.resolve_topics(None, "")


def test_truncated_sqlite_storage(tmp_path: Path) -> None:
    bag = _small_bag(tmp_path, "sqlite3")
    db = bag / "bag.db3"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    with pytest.raises(BagError, match="corrupt or truncated"):
        with BagReader(bag) as reader:
            list(reader.messages())


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_truncated_mcap_is_read_up_to_the_cut(tmp_path: Path, keep_metadata: bool) -> None:
    """An MCAP recording cut off at 90 % (no footer, no summary: rosbags cannot open it) is read up to the cut:
    the complete messages before it, in order and exact, and the reader says where the file ends."""
    frames = make_frames(6)
    write_image_bag(frames, BagWriteConfig(out=tmp_path / "bag", storage="mcap", start_time=START))
    whole = read_all(tmp_path / "bag")
    mcap = next((tmp_path / "bag").glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size * 9 // 10])
    if not keep_metadata:
        (tmp_path / "bag" / "metadata.yaml").unlink()
    with BagReader(tmp_path / "bag") as reader:
        assert reader.truncation is not None and "ends early at byte" in reader.truncation
        got = read_all(tmp_path / "bag")
    images = got["/camera/image_raw"]
    assert 3 <= len(images) < 6  # most frames survive the cut, the last ones do not
    for (t, stamp, frame_id, img), (t0, stamp0, frame_id0, img0) in zip(images, whole["/camera/image_raw"]):
        assert (t, stamp, frame_id) == (t0, stamp0, frame_id0)
        np.testing.assert_array_equal(img, img0)
    mcap.write_bytes(mcap.read_bytes()[:40])  # nothing complete left
    with pytest.raises(BagError, match="nothing could be read"):
        BagReader(tmp_path / "bag")


def test_replay_of_a_truncated_mcap_evaluates_what_is_there(tmp_path: Path, capsys) -> None:
    from ecmnet_core.cli import main as cli

    write_image_bag(make_frames(6), BagWriteConfig(out=tmp_path / "bag", storage="mcap", start_time=START))
    mcap = next((tmp_path / "bag").glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size * 9 // 10])
    assert cli(["replay", "--offline", str(tmp_path / "bag"), "--model", "baseline", "--num-classes", "4",
                "--input-size", "32", "48", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "note: bag truncated:" in captured.out and "ends early at byte" in captured.out
    assert "warm-up before the first frame, not counted" in captured.out  # graph capture is not a frame's time
    assert "Traceback" not in captured.err


def test_garbage_storage_and_missing_paths(tmp_path: Path) -> None:
    bag = _small_bag(tmp_path)
    (bag / "bag.db3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BagError, match="cannot be opened"):
        BagReader(bag)
    with pytest.raises(BagError, match="does not exist"):
        BagReader(tmp_path / "nothing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BagError, match="no metadata.yaml and not exactly one"):
        BagReader(tmp_path / "empty_dir")


def test_interrupted_recording_is_read_from_its_storage_file(tmp_path: Path) -> None:
    bag = _small_bag(tmp_path, "mcap")
    (bag / "metadata.yaml").unlink()
    with BagReader(bag) as reader:
        assert reader.topics["/camera/image_raw"].count == 3


def test_empty_bag(tmp_path: Path) -> None:
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    with Writer(tmp_path / "bag", version=9) as writer:
        writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
    with BagReader(tmp_path / "bag") as reader:
        with pytest.raises(BagError, match="is empty"):
            reader.resolve_topics(None, None)
    # a topic without messages next to others
    with Writer(tmp_path / "bag2", version=9) as writer:
        writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        conn = writer.add_connection("/other", "std_msgs/msg/String", typestore=ts)
        writer.write(conn, 1, ts.serialize_cdr(ts.types["std_msgs/msg/String"](data="x"), "std_msgs/msg/String"))
    with BagReader(tmp_path / "bag2") as reader:
        with pytest.raises(BagError, match="'/camera/image_raw' has no messages"):
            reader.resolve_topics("/camera/image_raw", "")


def test_undeserializable_message_is_skipped_and_counted(tmp_path: Path) -> None:
    bag = _small_bag(tmp_path)
    bad = tmp_path / "bad"
    from rosbags.rosbag2 import Writer

    with BagReader(bag) as reader, Writer(bad, version=9) as writer:
        conns = {}
        for c in reader._reader.connections:
            conns[c.topic] = writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data, rihs01=c.digest)
        for i, msg in enumerate(reader.messages(deserialize=())):
            raw = msg.raw[:40] if (i == 2 and msg.topic == "/camera/image_raw") else msg.raw  # cut one image short
            writer.write(conns[msg.topic], msg.t_ns, raw)
    with BagReader(bad) as reader:
        images = [m for m in reader.messages(["/camera/image_raw"])]
        assert len(images) == 2
        assert dict(reader.skipped) == {"/camera/image_raw: undeserializable sensor_msgs/msg/Image": 1}


def test_custom_data_survives_odd_values(tmp_path: Path) -> None:
    cfg = BagWriteConfig(out=tmp_path / "bag", start_time=START, custom={"note": "a: b", "nested": {"x": [1, 2]}})
    write_image_bag(make_frames(1), cfg)
    with BagReader(tmp_path / "bag") as reader:
        assert reader.custom_data["note"] == "a: b" and reader.custom_data["nested"] == {"x": [1, 2]}
