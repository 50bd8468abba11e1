"""Node building blocks without DDS: newest-frame slot, rate/latency windows, warning throttle, multi-camera topic
layout, parameter validation, coverage and camera_info messages."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ecmnet_ros.params import PARAMS, SPECS, LiveSettings, validate
from ecmnet_ros.stats import ErrorCounter, LatencyWindow, LatestSlot, RateMeter
from ecmnet_ros.topics import plan_streams


def test_latest_slot_keeps_only_the_newest_and_counts_drops():
    slot = LatestSlot()
    assert slot.take() is None
    assert slot.put("a", 1.0) is False
    assert slot.put("b", 2.0) is True and slot.put("c", 3.0) is True
    frame = slot.take()
    assert (frame.msg, frame.received) == ("c", 3.0) and slot.take() is None
    assert (slot.received, slot.dropped) == (3, 2)


def test_latest_slot_wakes_a_waiting_worker():
    cond = threading.Condition()
    slot = LatestSlot(cond)
    got = []

    def worker():
        with cond:
            cond.wait_for(slot.peek, timeout=5)
        got.append(slot.take().msg)

    thread = threading.Thread(target=worker)
    thread.start()
    slot.put("frame")
    thread.join(5)
    assert got == ["frame"]


def test_rate_meter_and_latency_window():
    meter = RateMeter(window=2.0)
    for i in range(20):
        meter.tick(100.0 + i * 0.1)  # 10 Hz for 2 s
    assert meter.rate(now=101.95) == pytest.approx(10.0, abs=0.6)
    assert meter.rate(now=110.0) == 0.0 and meter.count == 20
    window = LatencyWindow(size=100)
    assert all(np.isnan(window.percentiles(50, 95)))
    for v in range(1000):
        window.add(v)
    assert len(window) == 100  # bounded memory
    p50, p95 = window.percentiles(50, 95)
    assert p50 == pytest.approx(949.5) and p95 == pytest.approx(994.05)


def test_error_counter_throttles_per_kind():
    errors = ErrorCounter(period=5.0)
    assert errors.add("encoding", "bad 1", now=0.0) is True
    assert errors.add("encoding", "bad 2", now=1.0) is False
    assert errors.add("length", "bad 3", now=1.0) is True  # another kind is not throttled by the first
    assert errors.add("encoding", "bad 4", now=5.5) is True
    assert errors.counts == {"encoding": 3, "length": 1} and errors.total == 4 and errors.last_message == "bad 4"


def test_stream_layout_single_and_multi_camera():
    (single,) = plan_streams(None, False, "segmenter")
    assert (single.image, single.camera_info, single.output("labels")) == ("image", "camera_info", "~/labels")
    assert plan_streams([], True, "seg")[0].image == "image/compressed"
    front, rear, rel = plan_streams(["/front/image_raw", "/rear/cam/image_raw/compressed", "left/image"], False, "seg")
    assert (front.image, front.compressed, front.camera_info, front.output("coverage")) == \
        ("/front/image_raw", False, "/front/camera_info", "/front/seg/coverage")
    assert (rear.image, rear.compressed, rear.camera_info, rear.prefix) == \
        ("/rear/cam/image_raw/compressed", True, "/rear/cam/camera_info", "/rear/cam/seg")
    assert (rel.camera_info, rel.prefix) == ("left/camera_info", "left/seg")
    with pytest.raises(ValueError, match="same namespace"):
        plan_streams(["/cam/left", "/cam/right"], False, "seg")


def test_parameter_table_and_validation():
    assert len({p.name for p in PARAMS}) == len(PARAMS)
    assert {"checkpoint", "device", "input_size", "scan_backend", "backend"} <= \
        {p.name for p in PARAMS if p.kind == "configure"}
    assert {"overlay_alpha", "publish_color", "publish_overlay", "max_rate_hz", "coverage_classes"} <= \
        {p.name for p in PARAMS if p.kind == "live"}
    assert SPECS["overlay_alpha"].range == (0.0, 1.0)
    assert validate("device", "cuda:1") is None and validate("device", "gpu")
    assert validate("model", "ecmnet") is None and "not one of" in validate("model", "unet")
    assert validate("input_size", [0, 0]) is None and validate("input_size", [0, 64]) and validate("input_size", [8, 8])
    assert validate("coverage_classes", ["Sky"], ["Sky", "Road"]) is None
    assert "Car" in validate("coverage_classes", ["Car"], ["Sky", "Road"])
    live = LiveSettings.from_values({p.name: p.default for p in PARAMS})
    assert live == LiveSettings()


def test_coverage_and_camera_info_messages():
    pytest.importorskip("sensor_msgs")
    from sensor_msgs.msg import CameraInfo

    from ecmnet_ros.messages import coverage_array, coverage_stamped, scale_camera_info
    from ecmnet_ros.runtime import make_header

    cov = np.array([0.5, 0.25, 0.25], np.float32)
    msg = coverage_array(cov)
    assert list(msg.data) == [0.5, 0.25, 0.25] and msg.layout.dim[0].label == "class"
    assert (msg.layout.dim[0].size, msg.layout.dim[0].stride) == (3, 3)
    header = make_header(5_000_000_123, "cam")
    stamped = coverage_stamped(header, cov, ["a", "b", "c"], "node: coverage", only=("c", "a"))
    assert stamped.header.frame_id == "cam" and [kv.key for kv in stamped.status[0].values] == ["a", "c"]
    info = CameraInfo(width=640, height=480)
    info.k = [500.0, 0, 320.0, 0, 500.0, 240.0, 0, 0, 1.0]
    info.roi.width, info.roi.height = 640, 480
    out = scale_camera_info(info, header, 320, 240)
    assert (out.width, out.height, out.header.stamp.nanosec) == (320, 240, 123)
    assert list(out.k) == [250.0, 0, 160.0, 0, 250.0, 120.0, 0, 0, 1.0] and out.roi.width == 320
    assert info.width == 640  # the input is not modified


def test_heap_is_trimmed_after_input_size_changes_only(monkeypatch):
    """The worker hands freed heap back to the OS when input sizes change (at most once a second), never at a
    fixed size, where it would only cost time."""
    from ecmnet_core import allocator

    trims: list[float] = []
    clock = [100.0]
    monkeypatch.setattr(allocator, "malloc_trim", lambda: trims.append(clock[0]) or True)
    monkeypatch.setattr(allocator.time, "monotonic", lambda: clock[0])
    trim = allocator.TrimOnResize()
    trim(((360, 480, 3),))
    assert trims == [100.0]
    for _ in range(5):  # same size: nothing to give back
        clock[0] += 0.1
        trim(((360, 480, 3),))
    assert trims == [100.0]
    clock[0] += 0.1
    trim(((720, 960, 3),))  # a change 0.6 s after the last trim: not yet ...
    assert len(trims) == 1
    clock[0] += 1.0
    trim(((720, 960, 3),))  # ... but on the next frame, once a second has passed
    assert trims == [100.0, clock[0]]
    clock[0] += 10.0
    trim(((720, 960, 3),))
    assert len(trims) == 2


def test_the_node_bounds_middleware_memory_unless_fast_dds_is_configured():
    """main() points Fast DDS at the packaged profile (history memory freed with each sample; a stream of huge
    rejected frames took a reliable depth-500 subscription to 6.7 GB without it, ``python -m
    ecmnet_ros.bench_memory --stream wrong-step --reliable-depth 500``), and leaves a user's own setup alone."""
    import xml.etree.ElementTree as ET

    from ecmnet_ros.runtime import FASTDDS_PROFILE, bounded_middleware_memory

    env: dict[str, str] = {}
    assert "freed with each sample" in bounded_middleware_memory(env)
    assert env == {"FASTDDS_DEFAULT_PROFILES_FILE": str(FASTDDS_PROFILE), "RMW_FASTRTPS_USE_QOS_FROM_XML": "1"}
    policies = [e.text for e in ET.parse(FASTDDS_PROFILE).iter("{http://www.eprosima.com}historyMemoryPolicy")]
    assert policies == ["DYNAMIC", "DYNAMIC"]
    mine = {"FASTDDS_DEFAULT_PROFILES_FILE": "/etc/my_dds.xml"}
    assert "not applied" in bounded_middleware_memory(mine) and mine == {"FASTDDS_DEFAULT_PROFILES_FILE":
                                                                        "/etc/my_dds.xml"}
    other = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert bounded_middleware_memory(other) is None and len(other) == 1
