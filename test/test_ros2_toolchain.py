"""The package driven the way ROS users drive it, through the real tooling from ``../shared/ros2_python``:
``colcon build`` (plain and ``--symlink-install``) into a temporary workspace, ``source install/setup.bash``,
``ros2 launch`` / ``ros2 run`` as their own processes, and the ``ros2`` command line (node, topic, lifecycle,
param, pkg) against them. Every process gets localhost discovery and its own domain id; camera frames come from an
rclpy publisher in this process on that domain. Skips when ``ros2``/``colcon`` are not installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

try:
    import launch_ros  # noqa: F401
    import ros2cli  # noqa: F401

    HAVE_TOOLING = bool(shutil.which("ros2") and shutil.which("colcon"))
except ImportError:
    HAVE_TOOLING = False

pytestmark = pytest.mark.skipif(not HAVE_TOOLING, reason="real ROS 2 tooling not installed "
                                "(bash ../shared/ros2_python/install.sh, or scripts/setup.sh with ../shared present)")

#: Fast node settings: a random-weight baseline at a small network size, so configure takes a second.
FAST_PARAMS = {"model": "baseline", "num_classes": 4, "input_size": [64, 96], "warmup": 1}
FRAME_HW = (120, 160)
_domains = iter(range(60))


def next_domain() -> int:
    """A domain id for one test's processes, away from conftest's session domain (1..101 from the pid)."""
    return 110 + (os.getpid() + 7 * next(_domains)) % 100


def ros_env(domain: int) -> dict[str, str]:
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=str(domain),
               PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
    env.pop("ROS_LOCALHOST_ONLY", None)
    return env


def colcon_build(ws: Path, *extra: str) -> Path:
    (ws / "src").mkdir(parents=True, exist_ok=True)
    (ws / "src" / "ecmnet_ros").symlink_to(REPO, target_is_directory=True)
    done = subprocess.run(["colcon", "build", *extra], cwd=ws, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"colcon build {' '.join(extra)} failed:\n{done.stdout}\n{done.stderr}"
    assert (ws / "install" / "setup.bash").is_file()
    return ws


class Workspace:
    """A colcon workspace; ``shell(cmd)`` runs ``cmd`` in bash after ``source install/setup.bash``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.domains: set[int] = set()  # where a ros2 verb may have started a daemon (stopped at the end)

    def argv(self, command: str) -> list[str]:
        return ["bash", "-c", f"source {self.root}/install/setup.bash && exec {command}"]

    def run(self, command: str, domain: int, timeout: float = 60.0) -> subprocess.CompletedProcess:
        self.domains.add(domain)
        return subprocess.run(self.argv(command), env=ros_env(domain), capture_output=True, text=True,
                              timeout=timeout)

    def start(self, command: str, domain: int, log: Path) -> subprocess.Popen:
        """A process in its own session (a Ctrl-C to the group reaches launch and the node, as in a terminal)."""
        handle = log.open("w")
        self.domains.add(domain)
        return subprocess.Popen(self.argv(command), env=ros_env(domain), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def poll(self, command: str, domain: int, ok: Callable[[str], bool], timeout: float = 60.0) -> str:
        """Run ``command`` until its output satisfies ``ok`` (discovery takes a moment, more on a busy machine)."""
        deadline, out = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            done = self.run(command, domain, timeout=max(5.0, deadline - time.monotonic()))
            out = done.stdout + done.stderr
            if done.returncode == 0 and ok(done.stdout):
                return done.stdout
            time.sleep(0.5)
        raise AssertionError(f"`{command}` never gave the expected output within {timeout:g} s; last:\n{out}")


    def daemons(self) -> dict[int, str]:
        """pid -> command line of the ros2 daemons running in the domains this workspace used."""
        out = subprocess.run(["pgrep", "-af", "ros2-daemon"], capture_output=True, text=True).stdout.splitlines()
        return {int(line.split()[0]): line for line in out
                if any(f"--ros-domain-id {d} " in line for d in self.domains)}

    def stop_daemons(self) -> list[str]:
        """Stop the daemons the ``ros2`` verbs started in this workspace's domains (``ros2 param``/``lifecycle``/
        ``pkg`` start one when none runs): ``ros2 daemon stop``, then SIGTERM what did not exit. Returns the
        command lines of any still alive, which should be none."""
        for domain in sorted(self.domains):
            self.run("ros2 daemon stop", domain, timeout=30)
        deadline = time.monotonic() + 10.0
        while self.daemons() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.daemons():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while self.daemons() and time.monotonic() < deadline:
            time.sleep(0.2)
        return list(self.daemons().values())

def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(f"process did not exit within {timeout:g} s of {signal.Signals(sig).name}") from None


def signal_node(proc: subprocess.Popen, sig: int) -> None:
    """Signal the node process under ``ros2 launch``/``ros2 run`` alone, as a supervisor would (a group-wide
    SIGTERM makes ``ros2 launch`` re-raise it on itself by design, exit -15)."""
    import psutil

    (node,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "lib/ecmnet_ros/segmenter" in " ".join(p.cmdline())]
    node.send_signal(sig)


def assert_clean_exit(proc: subprocess.Popen, rc: int | None, log: Path, signal_name: str | None = None) -> None:
    """Exit status 0 and a log without a traceback or a kill; the node said which signal stopped it."""
    if proc.poll() is None:
        stop(proc, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "escalating to 'SIG" not in text, text  # launch had to kill the node
    assert "did not stop" not in text, text  # the inference worker was joined in time
    if signal_name:
        assert f"{signal_name}: shutting down" in text, text


class Camera:
    """A camera in this process: publishes frames on ``topic`` in ``domain`` at ~10 Hz and records what comes
    back on the subscribed topics."""

    def __init__(self, domain: int, topic: str, compressed: bool = False) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data

        from ecmnet_ros.runtime import make_header

        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node("test_camera", context=self.context)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self.received: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        if compressed:
            import cv2
            from sensor_msgs.msg import CompressedImage

            pub = self.node.create_publisher(CompressedImage, f"{topic}/compressed", qos_profile_sensor_data)
            jpeg = cv2.imencode(".jpg", self.frame())[1].tobytes()

            def make(n: int) -> Any:
                return CompressedImage(header=make_header(n * 100_000_000), format="jpeg", data=jpeg)
        else:
            from sensor_msgs.msg import Image

            pub = self.node.create_publisher(Image, topic, qos_profile_sensor_data)
            frame = self.frame()

            def make(n: int) -> Any:
                h, w = frame.shape[:2]
                return Image(header=make_header(n * 100_000_000), height=h, width=w, encoding="bgr8", step=w * 3,
                             data=frame.tobytes())
        self._count = 0

        def tick() -> None:
            self._count += 1
            pub.publish(make(self._count))

        self.node.create_timer(0.1, tick)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    @staticmethod
    def frame() -> np.ndarray:
        rng = np.random.default_rng(0)
        return rng.integers(0, 255, (*FRAME_HW, 3), dtype=np.uint8)

    def _spin(self) -> None:
        with contextlib.suppress(Exception):
            self._executor.spin()

    def listen(self, msg_type: Any, topic: str) -> None:
        self.received[topic] = []

        def keep(msg: Any) -> None:
            with self._lock:
                self.received[topic].append(msg)

        self.node.create_subscription(msg_type, topic, keep, 10)

    def count(self, topic: str) -> int:
        with self._lock:
            return len(self.received[topic])

    def wait_more(self, topic: str, more: int = 1, timeout: float = 60.0) -> bool:
        target, deadline = self.count(topic) + more, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(topic) >= target:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        import rclpy

        self._executor.shutdown()
        self._thread.join(10)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    ws = Workspace(colcon_build(tmp_path_factory.mktemp("colcon_ws")))
    yield ws
    assert ws.stop_daemons() == [], "ros2 daemons left running"


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("params") / "fast.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": FAST_PARAMS}}))
    return path


@contextlib.contextmanager
def camera(domain: int, topic: str, compressed: bool = False) -> Iterator[Camera]:
    cam = Camera(domain, topic, compressed)
    try:
        yield cam
    finally:
        cam.close()


def test_symlink_install_workspace_lists_the_executables(tmp_path: Path) -> None:
    """``colcon build --symlink-install``: ros2 pkg finds the package, its executables under the ROS names,
    and the launch file's arguments."""
    ws = Workspace(colcon_build(tmp_path / "ws", "--symlink-install"))
    domain = next_domain()
    execs = ws.run("ros2 pkg executables ecmnet_ros", domain).stdout.split("\n")
    assert {"ecmnet_ros segmenter", "ecmnet_ros make_bag", "ecmnet_ros replay"} <= set(execs)
    prefix = ws.run("ros2 pkg prefix ecmnet_ros", domain).stdout.strip()
    assert Path(prefix) == tmp_path / "ws" / "install" / "ecmnet_ros"
    args = ws.run("ros2 launch ecmnet_ros segment.launch.py --show-args", domain)
    assert args.returncode == 0, args.stderr
    for name in ("image_topic", "compressed", "namespace", "params_file", "autostart"):
        assert f"'{name}'" in args.stdout


def test_launched_node_through_the_ros2_command_line(workspace: Workspace, params_file: Path,
                                                     tmp_path: Path) -> None:
    """``ros2 launch`` with image_topic, compressed, namespace and params_file; then node list, topic list -t
    against the README's table, topic echo of labels and coverage while frames flow, and parameters: a live one
    applies to the next frames, a configure-time one is refused. Ctrl-C ends launch and node with exit 0."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float32MultiArray

    domain, log = next_domain(), tmp_path / "launch.log"
    proc = workspace.start(f"ros2 launch ecmnet_ros segment.launch.py image_topic:=/tc_cam/image compressed:=true "
                           f"namespace:=tc params_file:={params_file}", domain, log)
    try:
        with camera(domain, "/tc_cam/image", compressed=True) as cam:
            cam.listen(Image, "/tc/segmenter/labels")
            cam.listen(Float32MultiArray, "/tc/segmenter/coverage")
            workspace.poll("ros2 node list --no-daemon", domain, lambda out: "/tc/segmenter" in out.split())
            expected = {
                "/tc_cam/image/compressed": "sensor_msgs/msg/CompressedImage",
                "/tc_cam/camera_info": "sensor_msgs/msg/CameraInfo",
                "/tc/segmenter/labels": "sensor_msgs/msg/Image",
                "/tc/segmenter/color": "sensor_msgs/msg/Image",
                "/tc/segmenter/overlay": "sensor_msgs/msg/Image",
                "/tc/segmenter/coverage": "std_msgs/msg/Float32MultiArray",
                "/tc/segmenter/coverage_stamped": "diagnostic_msgs/msg/DiagnosticArray",
                "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
            }

            def listed(out: str) -> dict[str, str]:
                return dict(re.findall(r"^(\S+) \[(\S+)\]$", out, re.M))

            out = workspace.poll("ros2 topic list -t --no-daemon", domain,
                                 lambda out: expected.items() <= listed(out).items())
            assert expected.items() <= listed(out).items()

            assert cam.wait_more("/tc/segmenter/labels", 2), log.read_text()
            # the type given: without a daemon, echo resolves an untyped topic from one early graph query, which a
            # loaded machine can answer before discovery has caught up ("Could not determine the type");
            # --no-lost-messages: a loaded machine drops frames, and echo would print a non-YAML report first
            labels = workspace.run("ros2 topic echo --once --no-arr --no-lost-messages /tc/segmenter/labels "
                                   "sensor_msgs/msg/Image",
                                   domain, timeout=90)
            assert labels.returncode == 0, labels.stderr
            fields = yaml.safe_load(labels.stdout.split("---")[0])
            assert (fields["height"], fields["width"], fields["encoding"]) == (*FRAME_HW, "mono8")
            assert fields["header"]["frame_id"] == "camera"
            coverage = workspace.run("ros2 topic echo --once --no-lost-messages /tc/segmenter/coverage "
                                     "std_msgs/msg/Float32MultiArray",
                                     domain, timeout=90)
            assert coverage.returncode == 0, coverage.stderr
            doc = yaml.safe_load(coverage.stdout.split("---")[0])
            assert doc["layout"]["dim"][0]["label"] == "class" and len(doc["data"]) == FAST_PARAMS["num_classes"]
            assert abs(sum(doc["data"]) - 1.0) < 1e-3

            # live: coverage stops on the next frames while labels go on, and comes back. poll: without a daemon the
            # CLI waits only 5 s for the parameter services to be discovered, which a loaded machine can exceed
            # ("Wait for service timed out"); setting the same value again is harmless
            def set_ok(out: str) -> bool:
                return "Set parameter successful" in out

            off = workspace.poll("ros2 param set /tc/segmenter publish_coverage false", domain, set_ok)
            assert "Set parameter successful" in off
            assert cam.wait_more("/tc/segmenter/labels", 2)  # frames in flight when it was set may still count
            before = cam.count("/tc/segmenter/coverage")
            assert cam.wait_more("/tc/segmenter/labels", 5)
            assert cam.count("/tc/segmenter/coverage") == before
            on = workspace.poll("ros2 param set /tc/segmenter publish_coverage true", domain, set_ok)
            assert "Set parameter successful" in on
            assert cam.wait_more("/tc/segmenter/coverage", 2)

            # configure-time: refused on a configured node, value unchanged
            refused = workspace.run("ros2 param set /tc/segmenter input_size '[32, 48]'", domain)
            said = refused.stdout + refused.stderr
            assert "Setting parameter failed" in said and "applied on lifecycle configure" in said, said
            value = workspace.run("ros2 param get /tc/segmenter input_size", domain).stdout
            assert "64" in value and "96" in value
    finally:
        rc = stop(proc, signal.SIGINT)
        assert_clean_exit(proc, rc, log, "SIGINT")


def test_lifecycle_through_ros2_lifecycle(workspace: Workspace, params_file: Path, tmp_path: Path) -> None:
    """``autostart:=false``: the node waits unconfigured; ``ros2 lifecycle set`` walks it through configure,
    activate (labels flow), deactivate (they stop) and cleanup; a SIGTERM to the node then ends it cleanly, and
    launch with it."""
    from sensor_msgs.msg import Image

    domain, log = next_domain(), tmp_path / "launch.log"
    proc = workspace.start(f"ros2 launch ecmnet_ros segment.launch.py autostart:=false namespace:=lc "
                           f"params_file:={params_file}", domain, log)
    rc: int | None = None
    try:
        with camera(domain, "/lc/image") as cam:
            cam.listen(Image, "/lc/segmenter/labels")
            workspace.poll("ros2 lifecycle get /lc/segmenter", domain, lambda out: out.startswith("unconfigured"))
            assert "configure" in workspace.run("ros2 lifecycle list /lc/segmenter", domain).stdout
            for transition, state in (("configure", "inactive"), ("activate", "active")):
                done = workspace.run(f"ros2 lifecycle set /lc/segmenter {transition}", domain, timeout=120)
                assert "Transitioning successful" in done.stdout, done.stdout + done.stderr + log.read_text()
                assert workspace.run("ros2 lifecycle get /lc/segmenter", domain).stdout.startswith(state)
            assert cam.wait_more("/lc/segmenter/labels", 3), log.read_text()
            done = workspace.run("ros2 lifecycle set /lc/segmenter deactivate", domain)
            assert "Transitioning successful" in done.stdout
            time.sleep(1.0)  # a frame in flight during deactivate may still arrive
            before = cam.count("/lc/segmenter/labels")
            time.sleep(1.5)  # 15 frames published meanwhile
            assert cam.count("/lc/segmenter/labels") == before
            done = workspace.run("ros2 lifecycle set /lc/segmenter cleanup", domain)
            assert "Transitioning successful" in done.stdout
            assert workspace.run("ros2 lifecycle get /lc/segmenter", domain).stdout.startswith("unconfigured")
        signal_node(proc, signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        assert_clean_exit(proc, rc, log, "SIGTERM")
    assert "process has finished cleanly" in log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ros2_run_stops_cleanly_mid_inference(workspace: Workspace, tmp_path: Path, sig: int) -> None:
    """``ros2 run ecmnet_ros segmenter --ros-args --params-file``: with frames flowing into a model slow enough
    that the worker is always busy, SIGINT/SIGTERM end it with exit 0, the worker joined, no traceback."""
    from sensor_msgs.msg import Image

    params = tmp_path / "slow.yaml"
    slow = {**FAST_PARAMS, "model": "ecmnet", "input_size": [240, 320], "jit": False}
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": slow}}))
    domain, log = next_domain(), tmp_path / "run.log"
    proc = workspace.start(f"ros2 run ecmnet_ros segmenter --ros-args --params-file {params} -r __ns:=/rr",
                           domain, log)
    rc: int | None = None
    try:
        with camera(domain, "/rr/image") as cam:
            cam.listen(Image, "/rr/segmenter/labels")
            assert cam.wait_more("/rr/segmenter/labels", 2, timeout=120), log.read_text()
            if sig == signal.SIGINT:  # Ctrl-C: the whole foreground group, ros2 run and the node
                rc = stop(proc, sig)
            else:  # a supervisor's SIGTERM to the node; ros2 run hands on its exit status
                signal_node(proc, sig)
                rc = proc.wait(60)
    finally:
        assert_clean_exit(proc, rc, log, signal.Signals(sig).name)
