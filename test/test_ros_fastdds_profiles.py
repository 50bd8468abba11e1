"""``config/fastdds_large_frames.xml``, the profile for processes that publish raw frames over 512 KB best effort:
Fast DDS accepts it and gives the participant its 32 MB shared-memory segment (the default is 512 KB, too small
for a 720x1280 frame, which then goes over UDP in fragments and is lost whole when one fragment is). The segment
is a file in /dev/shm, which the check reads; delivery itself was measured, not tested (timing-dependent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds_large_frames.xml"
SHM = Path("/dev/shm")
PUBLISHER = """
import sys, rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node("ecmnet_profile_check")
node.create_publisher(Image, "/ecmnet_profile_check", qos_profile_sensor_data)
print("ready", flush=True)
sys.stdin.readline()
node.destroy_node()
rclpy.shutdown()
"""


def segments() -> dict[str, int]:
    return {p.name: p.stat().st_size for p in SHM.glob("fastdds_*") if p.is_file()}


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
@pytest.mark.skipif(os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != "rmw_fastrtps_cpp",
                    reason="a Fast DDS profile")
def test_the_large_frames_profile_gives_the_participant_a_32_mb_segment():
    before = segments()
    env = {**os.environ, "FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE)}
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        new = {name: size for name, size in segments().items() if name not in before}
        assert any(size >= 32 * 2**20 for size in new.values()), f"new Fast DDS segments: {new}"
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
