"""Parameters and lifecycle: out-of-range/invalid values rejected with a reason, configure-time parameters refused
while configured, live changes applied to the very next frame, deactivate/activate/cleanup/configure cycles over
the lifecycle services, configure failures reported, QoS overrides and the params file applied."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ecmnet_core.image_messages import image_to_array  # noqa: E402
from ecmnet_ros.params import PARAMS  # noqa: E402
from ecmnet_ros.runtime import TopicCollector, connected, stamp_ns, wait_for  # noqa: E402
from ecmnet_ros.segmenter import SegmenterNode  # noqa: E402

TIMEOUT = 20.0
CONFIG = Path(__file__).resolve().parents[1] / "config" / "segment.yaml"
FRAME = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)


def rejected(node, name, value) -> str:
    result = node.set_parameters([Parameter(name, value=value)])[0]
    assert not result.successful, f"{name}={value!r} was accepted"
    return result.reason


class Rig:
    """Publisher + collectors around one node under test, with lock-step frame sending."""

    def __init__(self, node, probe, image_msg, prefix="/segmenter"):
        self.node, self.probe, self.image_msg = node, probe, image_msg
        self.labels = TopicCollector(probe, Image, f"{prefix}/labels")
        self.pub = probe.create_publisher(Image, "/image", 10)
        self.stamp = 0

    def frame(self, expect_output=True, timeout=TIMEOUT):
        self.stamp += 1
        stamp = self.stamp
        if expect_output:  # both sides matched, or a best-effort frame can vanish
            assert wait_for(lambda: self.node.streams and self.node.streams[0].subscriptions and connected(
                self.pub, self.node.streams[0].subscriptions[0], self.labels.subscription), timeout)
        self.pub.publish(self.image_msg(FRAME, "bgr8", stamp))
        got = wait_for(lambda: any(stamp_ns(m.header) == stamp for m in self.labels.messages),
                       timeout if expect_output else 1.0)
        assert got == expect_output, f"frame {stamp}: output {'missing' if expect_output else 'unexpected'}"
        return stamp


def call(probe, client, request):
    assert client.wait_for_service(timeout_sec=5.0), client.srv_name
    future = client.call_async(request)
    assert wait_for(future.done, TIMEOUT), f"{client.srv_name} did not answer"
    return future.result()


def test_invalid_values_are_rejected_with_reasons(segmenter_node, probe):
    node = segmenter_node()
    assert "overlay_alpha" in rejected(node, "overlay_alpha", 1.5)
    rejected(node, "overlay_alpha", -0.1)
    rejected(node, "max_rate_hz", -1.0)
    rejected(node, "max_image_pixels", 0)
    rejected(node, "overlay_alpha", "half")  # wrong type
    assert "coverage_classes" in rejected(node, "coverage_classes", ["class_1", "Unicorn"])
    assert rejected(node, "class_names", ["a", "b"])  # read-only (rclpy's descriptor check)
    assert node.get_parameter("class_names").value == ["class_0", "class_1", "class_2", "class_3"]
    assert "configure" in rejected(node, "checkpoint", "")  # configure-time parameter while configured
    assert "configure" in rejected(node, "input_size", [32, 32])
    rejected(node, "autostart", False)  # start-up parameter: read-only
    assert node.get_parameter("overlay_alpha").value == 0.5 and node.get_parameter("input_size").value == [64, 96]

    # the same through the real parameter service, as `ros2 param set` does it
    client = probe.create_client(SetParameters, "/segmenter/set_parameters")
    request = SetParameters.Request(parameters=[ParameterMsg(name="overlay_alpha", value=ParameterValue(
        type=ParameterType.PARAMETER_DOUBLE, double_value=2.0))])
    result = call(probe, client, request).results[0]
    assert not result.successful and result.reason
    # configure-time values are validated too, before they can break the next configure
    node.trigger_deactivate()
    node.trigger_cleanup()
    assert "device" in rejected(node, "device", "gpu")
    assert "does not exist" in rejected(node, "checkpoint", "/nonexistent/model.pt")
    assert "input_size" in rejected(node, "input_size", [8, 8])
    assert "model" in rejected(node, "model", "resnet")
    assert "repeated" in rejected(node, "image_topics", ["/a/image", "/a/image"])
    assert node.set_parameters([Parameter("input_size", value=[32, 48])])[0].successful  # unconfigured: accepted


def test_live_changes_apply_to_the_next_frame(segmenter_node, probe, image_msg):
    node = segmenter_node()
    rig = Rig(node, probe, image_msg)
    overlay = TopicCollector(probe, Image, "/segmenter/overlay")
    color = TopicCollector(probe, Image, "/segmenter/color")
    stamped = TopicCollector(probe, DiagnosticArray, "/segmenter/coverage_stamped")
    assert wait_for(lambda: node.streams[0].wants("overlay") and node.streams[0].wants("color")
                    and connected(overlay.subscription, color.subscription, stamped.subscription), TIMEOUT)
    expected_labels = node.segmenter.segment(FRAME).labels

    for alpha in (0.5, 0.9, 0.0):
        assert node.set_parameters([Parameter("overlay_alpha", value=alpha)])[0].successful
        stamp = rig.frame()
        assert wait_for(lambda s=stamp: any(stamp_ns(m.header) == s for m in overlay.messages), TIMEOUT)
        msg = next(m for m in overlay.messages if stamp_ns(m.header) == stamp)
        np.testing.assert_array_equal(image_to_array(msg), node.segmenter.overlay(FRAME, expected_labels, alpha))

    assert node.set_parameters([Parameter("publish_color", value=False),
                                Parameter("coverage_classes", value=["class_2", "class_0"])])[0].successful
    before = len(color.messages)
    stamp = rig.frame()
    assert wait_for(lambda: any(stamp_ns(m.header) == stamp for m in stamped.messages), TIMEOUT)
    time.sleep(0.2)
    assert len(color.messages) == before, "colour published although publish_color is false"
    keys = [kv.key for kv in next(m for m in stamped.messages if stamp_ns(m.header) == stamp).status[0].values]
    assert keys == ["class_0", "class_2"]  # class-id order, only the selected ones

    # max_rate_hz: frames offered at ~20 Hz are processed at most twice per second of the window. The bound comes
    # from the measured window, not the nominal 1.6 s: a loaded machine stretches the sleeps, not the limit.
    assert node.set_parameters([Parameter("max_rate_hz", value=2.0)])[0].successful
    stream = node.streams[0]
    processed, received = stream.processed, stream.slot.received
    start = time.monotonic()
    for _ in range(20):
        rig.stamp += 1
        rig.pub.publish(image_msg(FRAME, "bgr8", rig.stamp))
        time.sleep(0.05)
    time.sleep(0.6)
    window = time.monotonic() - start
    done, offered = stream.processed - processed, stream.slot.received - received
    assert 1 <= done <= int(window * 2.0) + 1, f"{done} frames processed in {window:.2f} s at max_rate_hz 2"
    assert offered > done, f"{offered} frames arrived, {done} processed: nothing was held back by the limit"
    assert node.set_parameters([Parameter("max_rate_hz", value=0.0)])[0].successful
    rig.frame()


def test_lifecycle_cycles_over_services(segmenter_node, probe, image_msg):
    node = segmenter_node()
    rig = Rig(node, probe, image_msg)
    change = probe.create_client(ChangeState, "/segmenter/change_state")
    get = probe.create_client(GetState, "/segmenter/get_state")

    def transition(tid):
        assert call(probe, change, ChangeState.Request(transition=Transition(id=tid))).success, tid
        return call(probe, get, GetState.Request()).current_state.label

    rig.frame()
    for _ in range(3):
        assert transition(Transition.TRANSITION_DEACTIVATE) == "inactive"
        rig.frame(expect_output=False)
        assert node.diagnostics().status[0].values[0].value == "inactive"
        assert transition(Transition.TRANSITION_ACTIVATE) == "active"
        rig.frame()

    # cleanup releases the model; a configure-time change then takes effect on the next configure
    assert transition(Transition.TRANSITION_DEACTIVATE) == "inactive"
    assert transition(Transition.TRANSITION_CLEANUP) == "unconfigured"
    assert node.segmenter is None and node.streams == []
    assert node.set_parameters([Parameter("num_classes", value=3)])[0].successful
    assert transition(Transition.TRANSITION_CONFIGURE) == "inactive"
    assert node.get_parameter("class_names").value == ["class_0", "class_1", "class_2"]
    assert transition(Transition.TRANSITION_ACTIVATE) == "active"
    rig.frame()
    assert np.frombuffer(rig.labels.messages[-1].data, np.uint8).max() < 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_failed_configure_is_reported_and_recoverable(segmenter_node, probe, image_msg):
    node = segmenter_node(device="cuda:0", autostart=False)
    assert not node.bring_up()  # autostart false: stays unconfigured
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    status = node.diagnostics().status[0]
    assert status.level == DiagnosticStatus.ERROR
    assert "CUDA is not available" in status.message
    assert node.set_parameters([Parameter("device", value="cpu")])[0].successful
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    Rig(node, probe, image_msg).frame()


def test_params_file_and_qos_overrides_apply(ros_context, spinner, probe, image_msg, tmp_path):
    # the shipped YAML loads (types right), and a QoS override makes the image subscription reliable
    override = tmp_path / "qos.yaml"
    override.write_text("/**:\n  ros__parameters:\n    model: baseline\n    num_classes: 4\n"
                        "    input_size: [64, 96]\n    overlay_alpha: 0.25\n"
                        "    qos_overrides:\n      /image:\n        subscription:\n          reliability: reliable\n")
    node = SegmenterNode(context=ros_context, cli_args=["--ros-args", "--params-file", str(CONFIG),
                                                       "--params-file", str(override)])
    spinner.add(node)
    defaults = {p.name: p.default for p in PARAMS if p.default is not None}
    values = {k: v for k, v in node.parameter_values().items() if v is not None}
    assert {k: values[k] for k in defaults if k not in ("model", "num_classes", "overlay_alpha")} == \
        {k: v for k, v in defaults.items() if k not in ("model", "num_classes", "overlay_alpha")}
    assert node.get_parameter("overlay_alpha").value == 0.25
    assert node.bring_up()
    sub = node.streams[0].subscriptions[0]
    assert sub.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    Rig(node, probe, image_msg).frame()


def test_a_qos_override_stays_with_its_node(ros_context, spinner, segmenter_node, tmp_path):
    """rclpy applies QoS overrides to the profile object it is handed: the node hands it a copy, so a reliable
    override on one node does not become the default of the next node in the process."""
    override = tmp_path / "qos.yaml"
    override.write_text("/**:\n  ros__parameters:\n    qos_overrides:\n      /image:\n        subscription:\n"
                        "          reliability: reliable\n")
    first = SegmenterNode("first", context=ros_context, cli_args=["--ros-args", "--params-file", str(override)],
                          parameter_overrides=[Parameter("model", value="baseline"),
                                               Parameter("num_classes", value=4),
                                               Parameter("input_size", value=[64, 96])])
    spinner.add(first)
    assert first.bring_up()
    assert first.streams[0].subscriptions[0].qos_profile.reliability == ReliabilityPolicy.RELIABLE
    second = segmenter_node("second")
    assert second.streams[0].subscriptions[0].qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
