"""The node's ``~/confidence`` (lazy, same forward pass) and the live ``min_confidence`` mask, over real DDS."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from test_ros_node_outputs import TIMEOUT, labels_array, matching, send, street  # noqa: E402

from ecmnet_core.data import UNLABELED  # noqa: E402
from ecmnet_core.image_messages import image_to_array  # noqa: E402
from ecmnet_core.inference.pipeline import confidence_image  # noqa: E402
from ecmnet_ros.runtime import TopicCollector, connected, wait_for  # noqa: E402


def test_confidence_and_unknown_mask(segmenter_node, probe, image_msg):
    node = segmenter_node()
    seg = node.segmenter
    calls = []
    original = seg.segment_batch

    def spy(images, confidence=False, min_confidence=None):
        calls.append(confidence)
        return original(images, confidence=confidence, min_confidence=min_confidence)

    seg.segment_batch = spy
    labels = TopicCollector(probe, Image, "/segmenter/labels")
    pub = probe.create_publisher(Image, "/image", 10)
    assert wait_for(lambda: connected(pub, node.streams[0].subscriptions[0], labels.subscription), TIMEOUT)
    image = street(4)
    plain = labels_array(send(pub, image_msg(image, "bgr8", 11), labels, 11))
    assert calls == [False], "confidence computed without a subscriber"
    reference = original([image], confidence=True)[0]
    np.testing.assert_array_equal(plain, reference.labels)  # default min_confidence 0: nothing masked

    confidence = TopicCollector(probe, Image, "/segmenter/confidence")
    stamped = TopicCollector(probe, DiagnosticArray, "/segmenter/coverage_stamped")
    threshold = float(np.median(reference.confidence))  # a random-weight model: mask about half the pixels
    node.set_parameters([Parameter("min_confidence", value=threshold)])
    assert wait_for(lambda: node.streams[0].wants("confidence") and connected(confidence.subscription,
                                                                              stamped.subscription), TIMEOUT)
    out = send(pub, image_msg(image, "bgr8", 12, "cam"), labels, 12)
    assert wait_for(lambda: matching(confidence, 12) and matching(stamped, 12), TIMEOUT)
    conf_msg = matching(confidence, 12)
    assert conf_msg.encoding == "mono8" and (conf_msg.height, conf_msg.width) == image.shape[:2]
    assert conf_msg.header.frame_id == "cam" and conf_msg.header.stamp == out.header.stamp
    grey = image_to_array(conf_msg)
    np.testing.assert_array_equal(grey, confidence_image(reference.confidence))
    masked = labels_array(out)
    below = reference.confidence < threshold
    assert 0 < below.sum() < below.size
    np.testing.assert_array_equal(masked == UNLABELED, below)
    np.testing.assert_array_equal(masked[~below], reference.labels[~below])
    # the published grey level agrees with the mask up to one level of rounding
    level = threshold * 255
    assert np.all(grey[below] <= np.ceil(level)) and np.all(grey[~below] >= np.floor(level))
    unknown = {kv.key: float(kv.value) for kv in matching(stamped, 12).status[0].values}["unknown"]
    assert unknown == pytest.approx(below.mean(), abs=1e-5)
    assert calls[-1] is True


def test_shipped_model_on_a_camvid_frame_masks_what_it_is_unsure_of(segmenter_node, probe, image_msg, shared_dir):
    """The issue's scenario: the packaged CamVid model, -p min_confidence:=0.9, one val frame."""
    import cv2

    frame = sorted((shared_dir / "camvid" / "val").glob("*.png"))[0]
    image = cv2.imread(str(frame))
    node = segmenter_node(model="", num_classes=11, input_size=[0, 0], checkpoint="", min_confidence=0.9)
    labels = TopicCollector(probe, Image, "/segmenter/labels")
    confidence = TopicCollector(probe, Image, "/segmenter/confidence")
    pub = probe.create_publisher(Image, "/image", 10)
    assert wait_for(lambda: connected(pub, node.streams[0].subscriptions[0], labels.subscription,
                                      confidence.subscription) and node.streams[0].wants("confidence"), TIMEOUT)
    out = send(pub, image_msg(image, "bgr8", 21, "camvid"), labels, 21)
    assert wait_for(lambda: matching(confidence, 21), TIMEOUT)
    conf = matching(confidence, 21)
    assert conf.header == out.header and (conf.height, conf.width) == image.shape[:2] and conf.encoding == "mono8"
    grey, lab = image_to_array(conf), labels_array(out)
    masked = lab == UNLABELED
    assert 0 < masked.sum() < masked.size
    # 255 exactly where the confidence is below 0.9, up to one grey level of rounding around 229.5
    assert np.all(grey[masked] <= 230) and np.all(grey[~masked] >= 229)
