"""Lifecycle cleanup releases everything configure made: deactivate -> cleanup -> configure -> activate cycles
with frames flowing keep the thread count constant, the captured graphs' generated sources (torch.fx keeps each one
for the life of the process unless told otherwise) and the Python objects flat. RSS, which a busy machine makes
noisy, is the benchmark's: ``python -m ecmnet_ros.bench_memory --cycles 10``."""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

import torch  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ecmnet_core.engines import torch_engine  # noqa: E402
from ecmnet_ros.runtime import wait_for  # noqa: E402

FRAME = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)


class LabelCounter:
    """Counts the messages received without keeping them."""

    def __init__(self) -> None:
        self.count = 0

    def on_message(self, _msg: Image) -> None:
        self.count += 1  # one executor thread calls this; the test thread only reads


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_cleanup_configure_cycles_leave_nothing_behind(segmenter_node, probe, image_msg):
    node = segmenter_node()  # the small random-weight model, a fixed 64x96 input: a torch.export graph per configure
    pub = probe.create_publisher(Image, "/image", qos_profile_sensor_data)
    # labels are counted, not kept: kept messages would grow the object count by however many frames a busy
    # machine lets through between activation and measurement
    labels = LabelCounter()
    probe.create_subscription(Image, "/segmenter/labels", labels.on_message, 10)
    stop = threading.Event()

    def stream() -> None:  # frames keep arriving through every transition
        i = 0
        while not stop.is_set():
            i += 1
            pub.publish(image_msg(FRAME, "bgr8", stamp_ns=i))
            time.sleep(0.02)

    feeder = threading.Thread(target=stream, daemon=True)
    feeder.start()
    marks = []
    try:
        for cycle in range(1, 7):
            node.trigger_deactivate()
            node.trigger_cleanup()
            assert node.segmenter is None  # the model, engine and graphs are gone with the configuration
            node.trigger_configure()
            node.trigger_activate()
            seen = labels.count
            assert wait_for(lambda n=seen: labels.count > n, 60), f"no labels after cycle {cycle}"
            gc.collect()
            marks.append((os_threads(), len(torch_engine._fx_sources()), len(gc.get_objects())))
    finally:
        stop.set()
        feeder.join(5)
    threads, sources, objects = zip(*marks)
    assert threads[-1] == threads[1], f"OS threads per cycle: {threads}"
    assert sources[-1] == sources[1], f"torch.fx sources kept per cycle: {sources}"
    # before the fix ~140 objects a cycle stayed behind (the generated sources' loader entries); rclpy itself keeps
    # ~20 dead weak references a cycle
    assert objects[-1] - objects[1] < 4 * 60, f"Python objects per cycle: {objects}"
    assert torch.get_num_threads() >= 1
