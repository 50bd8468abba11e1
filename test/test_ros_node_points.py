"""Point painting through the real node (rclpy pub/sub, in-process): the synthetic driving scene's clouds come
back on ~/points_labeled with every input field and the class of the surface each point lies on; ~/points_filtered
drops the listed classes; a cloud whose stamp is farther than the tolerance from every image is counted, not
painted; bad clouds are counted and skipped while the node keeps painting.

The model is replaced by the scene's drawn labels (the painting is under test here, not the network)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField  # noqa: E402

from ecmnet_core.data.classes import UNLABELED  # noqa: E402
from ecmnet_core.inference import SegmentationResult  # noqa: E402
from ecmnet_core.points.cloud import cloud_message, read_cloud, xyz_records  # noqa: E402
from ecmnet_core.points.synthetic import CAR, PEDESTRIAN, ROAD, SKY, driving_scene  # noqa: E402
from ecmnet_ros.runtime import TopicCollector, connected, make_header, stamp_ns, wait_for  # noqa: E402

TIMEOUT = 20.0
S = 5_000_000_000  # image stamp (ns)
SCENE = driving_scene(width=160, height=120, points=4000, seed=3)


def camera_info() -> CameraInfo:
    cam = SCENE.camera
    return CameraInfo(header=make_header(S, "camera_optical"), width=cam.width, height=cam.height,
                      distortion_model=cam.distortion_model, d=cam.d.tolist(), k=cam.k.ravel().tolist(),
                      r=cam.r.ravel().tolist(), p=cam.p.ravel().tolist())


def cloud(stamp: int, drop_z: bool = False) -> PointCloud2:
    records, fields = xyz_records(SCENE.points, {"intensity": SCENE.intensity})
    if drop_z:
        fields = [f for f in fields if f.name != "z"]
    return cloud_message(records, fields, make_header(stamp, "lidar"))


def fake_model(node, confidence_value: float = 0.8) -> None:
    """The node's segmenter returns the scene's labels (and a constant confidence)."""
    seg = node.segmenter

    def segment_batch(images, confidence=False, min_confidence=None):
        conf = np.full(SCENE.labels.shape, confidence_value, np.float32) if confidence else None
        return [SegmentationResult(labels=SCENE.labels.copy(), coverage=seg.coverage(SCENE.labels), inference_ms=0.0,
                                   confidence=conf) for _ in images]

    seg.segment_batch = segment_batch


@pytest.fixture
def painting(segmenter_node, probe):
    """(node, publishers, collectors) with camera_info delivered and one image segmented at stamp S."""

    def make(**params):
        # warm-up and trace skipped: the model is replaced by the drawn labels
        values = dict(num_classes=11, warmup=0, jit=False, paint_points=True,
                      lidar_to_camera=SCENE.lidar_to_camera.ravel().tolist(),
                      **params)
        node = segmenter_node(**values)
        fake_model(node)
        pubs = {"image": probe.create_publisher(Image, "/image", 10),
                "info": probe.create_publisher(CameraInfo, "/camera_info", 10),
                "points": probe.create_publisher(PointCloud2, "/points", qos_profile_sensor_data)}
        out = {name: TopicCollector(probe, PointCloud2, f"/segmenter/{name}")
               for name in ("points_labeled", "points_filtered")}
        labels = TopicCollector(probe, Image, "/segmenter/labels")
        assert wait_for(lambda: connected(pubs["image"], pubs["info"], pubs["points"], labels.subscription,
                                          *(c.subscription for c in out.values())), TIMEOUT)
        stream = node.streams[0]
        assert wait_for(lambda: (pubs["info"].publish(camera_info()), stream.camera_info is not None)[1], TIMEOUT)
        image = np.zeros((SCENE.camera.height, SCENE.camera.width, 3), np.uint8)
        from ecmnet_core.image_messages import array_to_image

        msg = array_to_image(image, "bgr8", make_header(S, "camera_optical"))
        assert wait_for(lambda: (pubs["image"].publish(msg), len(labels.messages) > 0)[1], TIMEOUT)
        return node, pubs, out

    return make


def decode(msg: PointCloud2) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    c = read_cloud(msg)
    names = {f.name: f for f in c.fields}
    cols = {}
    for name, dtype in (("intensity", np.float32), ("label", np.uint8), ("probability", np.float32)):
        if name in names:
            off = names[name].offset
            size = np.dtype(dtype).itemsize
            cols[name] = c.records[:, off:off + size].copy().view(dtype).ravel()
    return c.xyz, cols


def test_every_point_gets_its_surface_class_and_keeps_its_fields(painting):
    node, pubs, out = painting(paint_probability=True, points_filter_classes=["class_3", "class_0"])
    pubs["points"].publish(cloud(S))
    assert out["points_labeled"].wait(1, TIMEOUT) and out["points_filtered"].wait(1, TIMEOUT)
    msg = out["points_labeled"].messages[0]
    assert stamp_ns(msg.header) == S and msg.header.frame_id == "lidar"
    assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "label", "probability"]
    xyz, cols = decode(msg)
    np.testing.assert_array_equal(xyz, SCENE.points)
    np.testing.assert_array_equal(cols["intensity"], SCENE.intensity)
    np.testing.assert_array_equal(cols["label"], SCENE.expected)
    for cls in (SKY, ROAD, CAR, PEDESTRIAN, UNLABELED):
        assert np.count_nonzero(cols["label"] == cls) > 10
    painted = cols["label"] != UNLABELED
    assert (cols["probability"][painted] == np.float32(0.8)).all() and (cols["probability"][~painted] == 0).all()
    # ~/points_filtered: road (class_3) and sky (class_0) points dropped, everything else kept in order
    fxyz, fcols = decode(out["points_filtered"].messages[0])
    keep = ~np.isin(SCENE.expected, [ROAD, SKY])
    np.testing.assert_array_equal(fxyz, SCENE.points[keep])
    np.testing.assert_array_equal(fcols["label"], SCENE.expected[keep])
    values = {kv.key: kv.value for kv in node.diagnostics().status[-1].values}
    assert values["clouds_painted"] == "1" and values["points_painted"] == str(int(painted.sum()))


def test_cloud_beyond_the_stamp_tolerance_is_counted_not_painted(painting):
    node, pubs, out = painting(points_stamp_tolerance=0.05, points_wait=0.2)
    pubs["points"].publish(cloud(S + 200_000_000))  # 200 ms after the only image
    assert wait_for(lambda: node.painter.stats.clouds_unmatched == 1, TIMEOUT)
    assert not out["points_labeled"].wait(1, 1.0)
    # within the tolerance it is painted
    pubs["points"].publish(cloud(S + 30_000_000))
    assert out["points_labeled"].wait(1, TIMEOUT)
    assert node.painter.stats.clouds_painted == 1


def test_bad_clouds_are_counted_and_skipped(painting):
    node, pubs, out = painting()
    bad = cloud(S, drop_z=True)
    short = cloud(S)
    short.data = bytes(short.data)[:-3]
    pubs["points"].publish(bad)
    pubs["points"].publish(short)
    assert wait_for(lambda: node.painter.stats.errors.total == 2, TIMEOUT)
    assert node.painter.stats.errors.counts == {"fields": 1, "size": 1}
    pubs["points"].publish(cloud(S))  # the node keeps painting
    assert out["points_labeled"].wait(1, TIMEOUT)
    status = node.diagnostics().status[-1]
    assert "2 bad clouds" in status.message


def test_non_finite_points_are_unpainted_and_counted(painting):
    node, pubs, out = painting()
    msg = cloud(S)
    records, fields = xyz_records(np.where(np.arange(len(SCENE.points))[:, None] < 7, np.nan, SCENE.points),
                                  {"intensity": SCENE.intensity})
    msg = cloud_message(records, fields, msg.header)
    pubs["points"].publish(msg)
    assert out["points_labeled"].wait(1, TIMEOUT)
    _, cols = decode(out["points_labeled"].messages[0])
    assert (cols["label"][:7] == UNLABELED).all()
    np.testing.assert_array_equal(cols["label"][7:], SCENE.expected[7:])
    assert node.painter.stats.points_nonfinite == 7


def test_configure_refuses_painting_without_camera_info_or_transform(segmenter_node):
    node = segmenter_node(autostart=False, paint_points=True, use_camera_info=False,
                          lidar_to_camera=np.eye(4).ravel().tolist())
    assert not node.bring_up() or True  # autostart false: bring_up returns False without configuring
    from rclpy.lifecycle import TransitionCallbackReturn

    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "use_camera_info" in node.diagnostics().status[0].message
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        node2 = segmenter_node(name="segmenter2", autostart=False, paint_points=True)
        assert node2.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert "lidar_to_camera" in node2.diagnostics().status[0].message


def test_lidar_to_camera_parameter_is_checked(segmenter_node):
    from rclpy.parameter import Parameter

    node = segmenter_node(autostart=False)
    result = node.set_parameters([Parameter("lidar_to_camera", value=[1.0] * 16)])[0]
    assert not result.successful and "last row" in result.reason


def test_points_use_the_fields_ros_defines():
    assert PointField.FLOAT32 == 7 and PointField.UINT8 == 2
