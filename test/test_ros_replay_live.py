"""Live replay against an in-process segmenter node: lock-step answers every frame (same accuracy as offline),
real-time playback faster than the model counts drops with bounded latency, /clock follows bag time, and a
missing node is a clear error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy is not installed (pip install -e '.[ros]')")
pytestmark = [pytest.mark.ros, pytest.mark.usefixtures("one_torch_thread")]  # one thread: the test CPU is shared

from ecmnet_core.bags import BagError, BagFrame, BagReader, BagWriteConfig, write_image_bag  # noqa: E402
from ecmnet_core.bags.replay import replay_offline  # noqa: E402
from ecmnet_core.cli import main as cli  # noqa: E402
from ecmnet_core.inference import InferenceConfig, Segmenter  # noqa: E402
from ecmnet_ros.replay_live import LiveReplay, LiveReplayConfig, parse_remaps, restamp  # noqa: E402

START = 1_700_000_000.0
K = 4
#: native input size and an explicit memory format, so the node's Segmenter computes exactly what the offline
#: Segmenter below computes (channels-last changes float rounding, which can flip near-tie argmaxes)
NODE = {"model": "baseline", "num_classes": K, "input_size": [0, 0], "warmup": 1, "channels_last": False}


@pytest.fixture(scope="module")
def bag(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    frames = []
    for i in range(6):
        image = cv2.resize(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), (96, 64), interpolation=cv2.INTER_CUBIC)
        label = cv2.resize(rng.integers(0, K, (4, 6), dtype=np.uint8), (96, 64), interpolation=cv2.INTER_NEAREST)
        frames.append(BagFrame(image, label, f"f{i}"))
    path = tmp_path_factory.mktemp("live") / "bag"
    write_image_bag(frames, BagWriteConfig(out=path, start_time=START,
                                           custom={"class_names": [f"c{i}" for i in range(K)]}))
    return path


def test_restamp_and_remap_parsing() -> None:
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.LATEST)
    image = ts.types["sensor_msgs/msg/Image"]
    header = ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=5, nanosec=7),
                                             frame_id="cam")
    msg = image(header=header, height=1, width=2, encoding="mono8", is_bigendian=0, step=2,
                data=np.array([1, 2], np.uint8))
    raw = bytes(ts.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    back = ts.deserialize_cdr(restamp(raw, 12_000_000_123), "sensor_msgs/msg/Image")
    assert (back.header.stamp.sec, back.header.stamp.nanosec, back.header.frame_id) == (12, 123, "cam")
    assert back.data.tolist() == [1, 2]
    assert parse_remaps(["/a:=/b", " /c := /d "]) == {"/a": "/b", "/c": "/d"}
    with pytest.raises(ValueError, match="must look like /from:=/to"):
        parse_remaps(["/a=/b"])


def test_lockstep_answers_every_frame_with_offline_accuracy(bag: Path, tmp_path: Path) -> None:
    """Every frame comes back; the node's labels score exactly like offline replay (native size: same pixels)."""
    cfg = LiveReplayConfig(bag=str(bag), spawn_node=True, lockstep=True, timeout=20.0, node_parameters=NODE,
                           namespace="/lockstep", remap={"/camera/image_raw": "/lockstep/camera"},
                           output_bag=str(tmp_path / "out_bag"))
    report = LiveReplay(cfg).run()
    s = report.summary()
    assert (s["frames"]["total"], s["frames"]["answered"], s["frames"]["dropped"], s["frames"]["evaluated"]) == \
        (6, 6, 0, 6)
    assert s["live"]["lockstep_timeouts"] == 0 and s["live"]["unexpected_results"] == 0
    assert s["timing"]["latency_ms"]["count"] == 6 and s["timing"]["latency_ms"]["max"] > 0
    assert s["bag"]["published_as"] == "/lockstep/camera" and s["segmenter"]["labels_topic"] == \
        "/lockstep/segmenter/labels"
    assert all(f.coverage is not None and f.coverage.sum() == pytest.approx(1.0, abs=1e-4) for f in report.frames)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmenter(InferenceConfig(model="baseline", num_classes=K, input_size=(0, 0), warmup=0,
                                        channels_last=False))
    with BagReader(bag) as reader:
        offline = replay_offline(reader, seg)
    np.testing.assert_array_equal(report.confusion.matrix, offline.confusion.matrix)
    with BagReader(tmp_path / "out_bag") as reader:
        assert reader.topics["/segmenter/labels"].count == 6


def test_realtime_faster_than_the_model_counts_drops(bag: Path) -> None:
    """Played at 8x (120 fps) in a loop: the node keeps only the newest frame, so frames are dropped (and
    counted) while the latency of the answered ones stays bounded instead of growing with a backlog."""
    cfg = LiveReplayConfig(bag=str(bag), spawn_node=True, rate=8.0, loop=True, duration=3.0, drain=5.0,
                           node_parameters=NODE, namespace="/realtime")
    report = LiveReplay(cfg).run()
    live, frames, lat = report.extra, report.summary()["frames"], report.summary()["timing"]["latency_ms"]
    assert live["published"] > 100  # 3 s at ~120 fps, several passes over the 6-frame bag
    assert 0 < live["received"] < live["published"]
    assert live["dropped"] == live["published"] - live["received"] == frames["dropped"] > 0
    assert live["unexpected_results"] == 0  # later passes are restamped, so results never match the wrong pass
    assert lat["count"] == live["received"] and lat["max"] < 3000.0
    assert all(f.latency_ms is None for f in report.frames if f.status == "dropped")
    assert max(f.loop for f in report.frames) >= 2


def test_clock_follows_bag_time(bag: Path) -> None:
    """--clock publishes /clock at bag time (a probe in its own context sees it), advancing with the frames."""
    from rosgraph_msgs.msg import Clock

    from ecmnet_ros.runtime import Spinner, TopicCollector, ros_context

    with ros_context() as context:
        spinner = Spinner(context).start()
        try:
            from rclpy.node import Node

            probe = spinner.add(Node("clock_probe", context=context))
            clocks = TopicCollector(probe, Clock, "/clock", 100)
            cfg = LiveReplayConfig(bag=str(bag), spawn_node=True, lockstep=True, clock_hz=40.0, timeout=20.0,
                                   node_parameters=NODE, namespace="/clocked")
            report = LiveReplay(cfg).run()
        finally:
            spinner.stop()
    assert report.extra["received"] == 6
    stamps = [m.clock.sec * 1_000_000_000 + m.clock.nanosec for m in clocks.messages]
    start, end = int(START * 1e9), int(START * 1e9) + 5 * 66_666_667
    assert len(stamps) >= 3
    assert all(start <= t <= end + 1_000_000_000 for t in stamps)
    assert stamps == sorted(stamps) and stamps[-1] > start


def test_no_node_is_a_clear_error(bag: Path) -> None:
    cfg = LiveReplayConfig(bag=str(bag), wait=0.5, namespace="/nobody")
    with pytest.raises(BagError, match="nobody subscribes to /camera/image_raw after 0.5 s.*--spawn-node"):
        LiveReplay(cfg).run()
    with pytest.raises(BagError, match=r"--remap: topic\(s\) \['/nope'\] are not in bag"):
        LiveReplay(LiveReplayConfig(bag=str(bag), remap={"/nope": "/x"}))
    with pytest.raises(ValueError, match="--rate must be > 0"):
        LiveReplayConfig(bag=str(bag), rate=0)


def test_cli_live_lockstep_writes_report(bag: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert cli(["replay", "--live", str(bag), "--spawn-node", "--model", "baseline", "--num-classes", str(K),
                "--input-size", "0", "0", "--lockstep", "--namespace", "cli", "--max-frames", "4", "--out", str(out),
                "--no-plots"]) == 0
    assert "lockstep replay of" in capsys.readouterr().out
    summary = json.loads((out / "report.json").read_text())
    assert summary["mode"] == "lockstep" and summary["live"]["published"] == summary["live"]["received"] == 4
    assert summary["segmenter"]["random_weights"] is True and summary["accuracy"]["miou"] is not None


def test_bag_clock_never_runs_backwards(bag: Path) -> None:
    """A lock-step hold at the previous frame's bag time lies behind the running clock: /clock must not follow it
    back (the fresh-clone failure of test_clock_follows_bag_time)."""
    import time as _time

    replay = LiveReplay(LiveReplayConfig(bag=str(bag), clock_hz=40.0))
    replay._clock = (_time.perf_counter() - 0.5, 1_000_000_000)  # playing: half a second past the anchor
    running = replay.bag_now()
    replay._clock_hold = 1_000_000_000  # lock-step wait at the previous frame's time
    held = replay.bag_now()
    replay._clock, replay._clock_hold = (_time.perf_counter(), 1_000_000_000), None  # re-anchored behind
    after = replay.bag_now()
    assert running >= 1_400_000_000 and held == running and after >= held
