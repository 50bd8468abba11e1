"""The segmenter node end to end over real DDS (in-process): every input encoding and compressed JPEG/PNG give a
mono8 label image with the input header and size, equal to what the Segmenter computes on the decoded image;
coverage matches the labels; colour/overlay only with subscribers; camera_info republished (scaled);
several cameras served by one node."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from std_msgs.msg import Float32MultiArray  # noqa: E402

from ecmnet_core.image_messages import array_to_compressed, image_to_array  # noqa: E402
from ecmnet_ros.runtime import TopicCollector, connected, make_header, stamp_ns, wait_for  # noqa: E402

H, W = 64, 96
TIMEOUT = 20.0


def street(seed: int) -> np.ndarray:
    """A BGR test image with large uniform regions (so classes differ across the frame)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 3] = (200, 150, 90)
    img[H // 3: 2 * H // 3] = rng.integers(0, 256, (1, W, 3))
    img[2 * H // 3:] = (80, 80, 80)
    return img


def matching(collector: TopicCollector, stamp: int):
    return next((m for m in collector.messages if stamp_ns(m.header) == stamp), None)


def send(pub, msg, collector, stamp: int, timeout: float = TIMEOUT):
    """Publish ``msg`` and wait for the output with the same stamp (re-sent once: the input is best effort)."""
    pub.publish(msg)
    if not wait_for(lambda: matching(collector, stamp) is not None, timeout / 2):
        pub.publish(msg)
        assert wait_for(lambda: matching(collector, stamp) is not None, timeout / 2), f"no output for stamp {stamp}"
    return matching(collector, stamp)


def labels_array(msg) -> np.ndarray:
    assert msg.encoding == "mono8"
    return image_to_array(msg)


def test_every_encoding_gives_labels_with_input_header_and_size(segmenter_node, probe, image_msg):
    node = segmenter_node()
    labels = TopicCollector(probe, Image, "/segmenter/labels")
    coverage = TopicCollector(probe, Float32MultiArray, "/segmenter/coverage")
    stamped = TopicCollector(probe, DiagnosticArray, "/segmenter/coverage_stamped")
    pub = probe.create_publisher(Image, "/image", 10)
    assert wait_for(lambda: connected(pub, node.streams[0].subscriptions[0], labels.subscription,
                                      coverage.subscription, stamped.subscription), TIMEOUT)
    bgr = street(1)
    gray = bgr[..., 1].copy()
    sources = {"bgr8": bgr, "rgb8": bgr[..., ::-1], "bgra8": np.dstack([bgr, gray]),
               "rgba8": np.dstack([bgr[..., ::-1], gray]), "mono8": gray,
               "mono16": gray.astype(np.uint16) * 257, "16UC1": gray.astype(np.uint16) * 257}
    expected_color = node.segmenter.segment(bgr).labels
    expected_gray = node.segmenter.segment(gray).labels
    for i, encoding in enumerate(sources):
        stamp = 1_000_000_000 * (i + 1) + 17
        out = send(pub, image_msg(np.ascontiguousarray(sources[encoding]), encoding, stamp, f"cam_{encoding}"),
                   labels, stamp)
        assert out.header.frame_id == f"cam_{encoding}", encoding
        assert (out.height, out.width) == (H, W), encoding
        lab = labels_array(out)
        expected = expected_gray if encoding in ("mono8", "mono16", "16UC1") else expected_color
        np.testing.assert_array_equal(lab, expected, err_msg=encoding)
        assert wait_for(lambda i=i, stamp=stamp: len(coverage) > i and matching(stamped, stamp), TIMEOUT)
        cov = np.asarray(coverage.messages[-1].data, np.float64)  # lock-step: the newest is this frame's
        assert coverage.messages[-1].layout.dim[0].label == "class" and cov.shape == (4,)
        np.testing.assert_allclose(cov, np.bincount(lab.ravel(), minlength=4)[:4] / lab.size, atol=1e-6)
        assert cov.sum() == pytest.approx(1.0, abs=1e-5)
        status = matching(stamped, stamp).status[0]
        assert matching(stamped, stamp).header.frame_id == f"cam_{encoding}"
        assert [kv.key for kv in status.values] == node.get_parameter("class_names").value
        np.testing.assert_allclose([float(kv.value) for kv in status.values], cov, atol=1e-5)


def test_colour_and_overlay_only_while_subscribed(segmenter_node, probe, image_msg):
    node = segmenter_node()
    calls = {"colorize": 0, "overlay": 0}
    seg = node.segmenter
    for name in calls:
        original = getattr(seg, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(seg, name, counted)
    labels = TopicCollector(probe, Image, "/segmenter/labels")
    pub = probe.create_publisher(Image, "/image", 10)
    assert wait_for(lambda: connected(pub, node.streams[0].subscriptions[0], labels.subscription), TIMEOUT)
    send(pub, image_msg(street(2), "bgr8", 5), labels, 5)
    assert calls == {"colorize": 0, "overlay": 0}, "colour/overlay computed without subscribers"

    color = TopicCollector(probe, Image, "/segmenter/color")
    overlay = TopicCollector(probe, Image, "/segmenter/overlay")
    assert wait_for(lambda: node.streams[0].wants("color") and node.streams[0].wants("overlay")
                    and connected(color.subscription, overlay.subscription), TIMEOUT)
    out = send(pub, image_msg(street(3), "bgr8", 6), labels, 6)
    assert wait_for(lambda: matching(color, 6) and matching(overlay, 6), TIMEOUT)
    lab = labels_array(out)
    col, ovl = matching(color, 6), matching(overlay, 6)
    assert col.encoding == ovl.encoding == "bgr8" and (col.height, col.width) == (H, W)
    np.testing.assert_array_equal(image_to_array(col), seg.colorize(lab))
    np.testing.assert_array_equal(image_to_array(ovl), seg.overlay(street(3), lab, 0.5))


def test_camera_info_is_republished_with_label_header_and_scaled(segmenter_node, probe, image_msg):
    node = segmenter_node()
    infos = TopicCollector(probe, CameraInfo, "/segmenter/camera_info")
    labels = TopicCollector(probe, Image, "/segmenter/labels")
    info_pub = probe.create_publisher(CameraInfo, "/camera_info", 10)
    pub = probe.create_publisher(Image, "/image", 10)
    assert wait_for(lambda: connected(pub, info_pub, *node.streams[0].subscriptions, labels.subscription,
                                      infos.subscription), TIMEOUT)
    info = CameraInfo(header=make_header(1, "cam"), width=2 * W, height=2 * H, distortion_model="plumb_bob")
    info.k = [200.0, 0.0, 96.0, 0.0, 210.0, 64.0, 0.0, 0.0, 1.0]
    info.p = [200.0, 0.0, 96.0, -20.0, 0.0, 210.0, 64.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    info_pub.publish(info)
    assert wait_for(lambda: node.streams[0].camera_info is not None, TIMEOUT)
    send(pub, image_msg(street(4), "bgr8", 10, "cam"), labels, 10)
    assert wait_for(lambda: matching(infos, 10) is not None, TIMEOUT)
    out = matching(infos, 10)
    assert (out.width, out.height) == (W, H) and out.header.frame_id == "cam"
    np.testing.assert_allclose(out.k, [100.0, 0, 48.0, 0, 105.0, 32.0, 0, 0, 1.0])
    np.testing.assert_allclose(out.p, [100.0, 0, 48.0, -10.0, 0, 105.0, 32.0, 0, 0, 0, 1.0, 0])


def test_several_cameras_raw_and_compressed_one_model(segmenter_node, probe, image_msg):
    node = segmenter_node(image_topics=["/front/image_raw", "/rear/image_raw/compressed", "/side/image_raw"])
    assert len(node.streams) == 3
    outs = {cam: TopicCollector(probe, Image, f"/{cam}/segmenter/labels") for cam in ("front", "rear", "side")}
    pubs = {"front": probe.create_publisher(Image, "/front/image_raw", 10),
            "rear": probe.create_publisher(CompressedImage, "/rear/image_raw/compressed", 10),
            "side": probe.create_publisher(Image, "/side/image_raw", 10)}
    assert wait_for(lambda: connected(*pubs.values(), *(s.subscriptions[0] for s in node.streams),
                                      *(c.subscription for c in outs.values())), TIMEOUT)
    img = street(5)
    expected = node.segmenter.segment(img).labels
    send(pubs["front"], image_msg(img, "bgr8", 100, "front"), outs["front"], 100)
    png = array_to_compressed(img, "png", make_header(200, "rear"))
    np.testing.assert_array_equal(labels_array(send(pubs["rear"], png, outs["rear"], 200)), expected)
    jpeg = array_to_compressed(img, "jpeg", make_header(201, "rear"), quality=95)
    out = send(pubs["rear"], jpeg, outs["rear"], 201)
    assert (out.height, out.width, out.header.frame_id) == (H, W, "rear")
    send(pubs["side"], image_msg(img, "rgb8", 300, "side"), outs["side"], 300)
    assert [stamp_ns(m.header) for m in outs["front"].messages] == [100]
    np.testing.assert_array_equal(labels_array(outs["front"].messages[0]), expected)
    assert all(m.header.frame_id == "side" for m in outs["side"].messages)


def test_onnxruntime_backend_serves_the_same_labels(segmenter_node, probe, image_msg, tmp_path, monkeypatch):
    """``backend: onnxruntime`` (the checkpoint exported once at input_size, cached) publishes labels equal to
    those of the torch backend on >= 99.9 % of pixels, and diagnostics/logs name the backend."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("ECMNET_CACHE_DIR", str(tmp_path))
    node = segmenter_node(backend="onnxruntime", model="", input_size=[H, W])
    assert node.segmenter.describe()["backend"] == "onnxruntime"
    assert list(tmp_path.glob("onnx/*.onnx")), "no cached export"
    labels = TopicCollector(probe, Image, "/segmenter/labels")
    pub = probe.create_publisher(Image, "/image", 10)
    assert wait_for(lambda: connected(pub, node.streams[0].subscriptions[0], labels.subscription), TIMEOUT)
    from ecmnet_core.inference import InferenceConfig, Segmenter

    reference = Segmenter(InferenceConfig(device="cpu", input_size=(H, W), warmup=0))
    bgr = street(3)
    out = send(pub, image_msg(bgr, "bgr8", 5_000_000_007), labels, 5_000_000_007)
    assert (labels_array(out) == reference.segment(bgr).labels).mean() >= 0.999
