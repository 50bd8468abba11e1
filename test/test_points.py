"""Point painting without ROS: the camera model against OpenCV, the PointCloud2 codec against sensor_msgs_py,
the synthetic driving scene (every painted point has the class of the surface it lies on), stamp matching."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ecmnet_core.data.classes import UNLABELED
from ecmnet_core.points.camera import CameraModel, CameraModelError
from ecmnet_core.points.cloud import CloudError, Field, cloud_message, labeled_records, read_cloud, xyz_records
from ecmnet_core.points.painting import (
    CloudMatcher,
    LabelFrame,
    paint_points,
    rigid_transform,
    transform_from_quaternion,
)
from ecmnet_core.points.synthetic import CAR, PEDESTRIAN, ROAD, SKY, driving_scene

K = np.array([[500.0, 0, 319.5], [0, 510.0, 239.5], [0, 0, 1]])
RNG = np.random.default_rng(0)
IN_FRONT = RNG.uniform([-3, -2, 2], [3, 2, 10], (2000, 3))


def camera(d=(), model="plumb_bob", r=None, p=None, width=640, height=480) -> CameraModel:
    r = np.eye(3) if r is None else r
    p = np.zeros(12) if p is None else p
    return CameraModel(width, height, K, np.asarray(d, float), model, r, p)


@pytest.mark.parametrize("model,d", [
    ("plumb_bob", [-0.2, 0.05, 0.001, -0.002, 0.01]),
    ("plumb_bob", [-0.2, 0.05, 0.001, -0.002]),  # 4 coefficients: k3 = 0
    ("rational_polynomial", [0.1, -0.05, 0.001, 0.002, 0.01, 0.2, -0.03, 0.01]),
])
def test_raw_projection_matches_cv2_project_points(model, d):
    uv, valid = camera(d, model).project(IN_FRONT)
    ref, _ = cv2.projectPoints(IN_FRONT, np.zeros(3), np.zeros(3), K, np.asarray(d, float))
    assert valid.all()
    np.testing.assert_allclose(uv, ref[:, 0], atol=1e-6)


def test_fisheye_projection_matches_cv2_fisheye():
    d = np.array([0.1, 0.01, -0.01, 0.002])
    uv, valid = camera(d, "equidistant").project(IN_FRONT)
    ref, _ = cv2.fisheye.projectPoints(IN_FRONT.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K, d)
    assert valid.all()
    np.testing.assert_allclose(uv, ref[:, 0], atol=1e-6)


def test_rectified_projection_uses_r_then_p_like_image_geometry():
    angle = 0.05
    r = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    p = np.array([[480.0, 0, 320, -48.0], [0, 480.0, 240, 0], [0, 0, 1, 0]])  # a stereo right camera: Tx
    uv, valid = camera([-0.3, 0.1, 0, 0, 0], r=r, p=p).project(IN_FRONT, rectified=True)
    rect = IN_FRONT @ r.T
    hom = np.hstack([rect, np.ones((len(rect), 1))]) @ p.T
    assert valid.all()
    np.testing.assert_allclose(uv, hom[:, :2] / hom[:, 2:], atol=1e-9)


def test_points_behind_or_in_the_plane_and_non_finite_are_invalid():
    pts = np.array([[0, 0, -1.0], [0, 0, 0.0], [np.nan, 0, 5], [0, np.inf, 5], [0.1, 0.1, 5]])
    _, valid = camera([-0.2, 0.05, 0, 0, 0]).project(pts)
    assert valid.tolist() == [False, False, False, False, True]


def test_points_where_the_distortion_folds_back_are_invalid():
    # strong barrel distortion: r_d = r (1 - 0.5 r^2) peaks at r = 0.816 and then comes back towards the centre
    cam = camera([-0.5, 0, 0, 0, 0])
    far_off_axis = np.array([[1.5, 0, 1.0]])  # r = 1.5: would land at r_d = -0.19, inside the image
    uv, valid = cam.project(far_off_axis)
    assert not valid[0]
    assert cam.project(np.array([[0.7, 0, 1.0]]))[1][0]


def test_nearest_pixel_convention_and_image_border():
    cam = CameraModel.pinhole(100.0, 100.0, 0.0, 0.0, 4, 3)  # u = 100 x / z
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    us = [-0.51, -0.5, 0.49, 0.5, 3.49, 3.5]
    pts = np.array([[u / 100.0, 0.0, 1.0] for u in us])
    got = paint_points(pts, [(LabelFrame(1, labels, cam), np.eye(4))]).labels
    assert got.tolist() == [UNLABELED, 0, 0, 1, 3, UNLABELED]


def test_camera_info_roi_binning_and_scaling():
    info = SimpleNamespace(width=640, height=480, k=K.ravel().tolist(), d=[0.0] * 5, distortion_model="plumb_bob",
                           r=np.eye(3).ravel().tolist(), p=[0.0] * 12, binning_x=2, binning_y=2,
                           roi=SimpleNamespace(x_offset=100, y_offset=40, width=400, height=300))
    cam = CameraModel.from_camera_info(info)
    assert (cam.width, cam.height) == (200, 150)
    np.testing.assert_allclose(cam.k[0], [250.0, 0, (319.5 - 100) / 2])
    np.testing.assert_allclose(cam.k[1], [0, 255.0, (239.5 - 40) / 2])
    half = camera().scaled(320, 240)
    np.testing.assert_allclose(half.k[:2], K[:2] / 2)  # as image_proc's resize and the node's ~/camera_info


def test_bad_camera_info_is_a_clear_error():
    with pytest.raises(CameraModelError, match="focal"):
        CameraModel(640, 480, np.zeros((3, 3)), np.zeros(5), "plumb_bob", np.eye(3), np.zeros(12))
    with pytest.raises(CameraModelError, match="kannala"):
        camera([0.1], "kannala")
    with pytest.raises(CameraModelError, match="coefficients"):
        camera([0.1, 0, 0, 0, 0, 0.3], "plumb_bob")


def test_transforms():
    q = (0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4))  # 90 degrees about z
    m = transform_from_quaternion((1, 2, 3), q)
    np.testing.assert_allclose(m @ [1, 0, 0, 1], [1, 3, 3, 1], atol=1e-12)
    assert rigid_transform(m.ravel().tolist()).shape == (4, 4)
    with pytest.raises(ValueError, match="16 numbers"):
        rigid_transform([1.0] * 12)
    with pytest.raises(ValueError, match="orthonormal"):
        rigid_transform(np.diag([2.0, 1, 1, 1]))
    with pytest.raises(ValueError, match="last row"):
        rigid_transform(np.ones((4, 4)))


# ------------------------------------------------------------------------------------------ synthetic scene
@pytest.mark.parametrize("distorted", [False, True])
def test_synthetic_scene_every_point_gets_the_class_of_its_surface(distorted):
    scene = driving_scene(points=20_000, seed=1, distorted=distorted)
    expected = scene.expected
    # the scene has every kind of point
    for cls in (SKY, ROAD, CAR, PEDESTRIAN, UNLABELED):
        assert np.count_nonzero(expected == cls) > 20, cls
    result = paint_points(scene.points, [(LabelFrame(1, scene.labels, scene.camera), scene.lidar_to_camera)])
    np.testing.assert_array_equal(result.labels, expected)
    # behind the camera: 255 (the LiDAR -> camera transform is applied before the depth test)
    cam = scene.points @ scene.lidar_to_camera[:3, :3].T + scene.lidar_to_camera[:3, 3]
    assert (result.labels[cam[:, 2] <= 0] == UNLABELED).all()


def test_painting_with_a_resized_label_image_and_probability():
    scene = driving_scene(points=5000, seed=2, distorted=False)
    half = cv2.resize(scene.labels, (240, 180), interpolation=cv2.INTER_NEAREST)
    confidence = np.full(half.shape, 0.75, np.float32)
    frame = LabelFrame(1, half, scene.camera, confidence=confidence)  # camera at 480x360, labels at 240x180
    result = paint_points(scene.points, [(frame, scene.lidar_to_camera)])
    agree = (result.labels == scene.expected).mean()
    assert agree > 0.97  # half resolution moves class boundaries by up to a pixel
    assert (result.probability[result.labels != UNLABELED] == 0.75).all()
    assert (result.probability[result.labels == UNLABELED] == 0).all()


def test_first_camera_that_sees_a_point_paints_it():
    cam = CameraModel.pinhole(100.0, 100.0, 49.5, 49.5, 100, 100)
    front = LabelFrame(1, np.full((100, 100), 1, np.uint8), cam)
    also = LabelFrame(1, np.full((100, 100), 2, np.uint8), cam)
    turned = np.eye(4)
    turned[:3, :3] = [[-1, 0, 0], [0, 1, 0], [0, 0, -1]]  # looks backwards
    pts = np.array([[0, 0, 5.0], [0, 0, -5.0], [np.nan, 0, 1]], np.float32)
    result = paint_points(pts, [(front, np.eye(4)), (also, np.eye(4)), (LabelFrame(1, also.labels, cam), turned)])
    assert result.labels.tolist() == [1, 2, UNLABELED]
    assert result.nonfinite == 1


# ---------------------------------------------------------------------------------------------- matching
def frame(stamp_ns: int) -> LabelFrame:
    return LabelFrame(stamp_ns, np.zeros((2, 2), np.uint8), CameraModel.pinhole(1, 1, 0, 0, 2, 2))


def test_matcher_pairs_nearest_stamp_within_tolerance():
    m = CloudMatcher([0], tolerance_s=0.05, wait_s=1.0)
    assert m.add_labels(0, frame(1_000_000_000), now=0.0) == []
    # cloud 30 ms after the newest labels: it waits (a closer frame may still come)
    assert m.add_cloud("a", 1_030_000_000, now=0.0) == []
    (done,) = m.add_labels(0, frame(1_066_000_000), now=0.1)  # 36 ms after the cloud: the 30 ms one is nearer
    assert done.item == "a" and done.frames[0].stamp_ns == 1_000_000_000
    # a cloud far from every frame is decided with no frames (unmatched)
    (late,) = m.add_cloud("b", 1_500_000_000, now=0.2) or m.expire(now=1.3)
    assert late.item == "b" and late.frames == {}


def test_matcher_waits_then_decides_and_bounds_the_queue():
    m = CloudMatcher([0], tolerance_s=0.05, wait_s=0.5, max_pending=2)
    m.add_labels(0, frame(100), now=0.0)
    assert m.add_cloud("a", 200, now=0.0) == []  # labels at 100 ns < 200: not final yet
    assert m.expire(now=0.4) == []
    (done,) = m.expire(now=0.5)
    assert done.item == "a" and 0 in done.frames  # 100 ns away: within tolerance
    m.add_cloud("b", 300, now=1.0)
    m.add_cloud("c", 400, now=1.0)
    (early,) = m.add_cloud("d", 500, now=1.0)  # a third waiting cloud pushes the oldest out
    assert early.item == "b" and m.pending == 2


def test_matcher_with_two_cameras_waits_for_both():
    m = CloudMatcher(["front", "rear"], tolerance_s=0.05, wait_s=1.0)
    m.add_cloud("a", 1000, now=0.0)
    assert m.add_labels("front", frame(1000), now=0.0) == []
    (done,) = m.add_labels("rear", frame(2000), now=0.0)
    assert set(done.frames) == {"front", "rear"}


# ------------------------------------------------------------------------------------------- cloud codec
def msg_from(records: np.ndarray, fields: list[Field], height: int = 1, big: bool = False, row_pad: int = 0):
    n, step = records.shape
    width = n // height
    rows = records.reshape(height, width * step)
    data = np.hstack([rows, np.zeros((height, row_pad), np.uint8)]).ravel()
    return SimpleNamespace(height=height, width=width, fields=[SimpleNamespace(**vars(f)) for f in fields],
                           is_bigendian=big, point_step=step, row_step=width * step + row_pad, data=data.tobytes())


def test_codec_reads_organized_padded_big_endian_float64_clouds():
    xyz = RNG.normal(size=(12, 3))
    dt = np.dtype([("x", ">f8"), ("y", ">f8"), ("z", ">f8"), ("ring", ">u2"), ("pad", "V6")])
    table = np.zeros(12, dt)
    table["x"], table["y"], table["z"], table["ring"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], np.arange(12)
    fields = [Field("x", 0, 8), Field("y", 8, 8), Field("z", 16, 8), Field("ring", 24, 4)]
    msg = msg_from(table.view(np.uint8).reshape(12, 32), fields, height=3, big=True, row_pad=5)
    cloud = read_cloud(msg)
    assert (cloud.height, cloud.width, cloud.point_step, len(cloud)) == (3, 4, 32, 12)
    np.testing.assert_array_equal(cloud.xyz, xyz)
    records, out_fields = labeled_records(cloud, np.arange(12, dtype=np.uint8))
    assert [f.name for f in out_fields] == ["x", "y", "z", "ring", "label"]
    assert records.shape == (12, 36) and (records[:, 32] == np.arange(12)).all()
    np.testing.assert_array_equal(records[:, :32], table.view(np.uint8).reshape(12, 32))  # input bytes kept


@pytest.mark.parametrize("change,kind", [
    (lambda m: m.fields.pop(2), "fields"),
    (lambda m: setattr(m.fields[0], "datatype", 5), "fields"),
    (lambda m: setattr(m.fields[3], "datatype", 42), "fields"),
    (lambda m: setattr(m, "point_step", 12), "point_step"),
    (lambda m: setattr(m, "data", m.data[:-1]), "size"),
    (lambda m: setattr(m, "row_step", 10), "size"),
])
def test_codec_names_what_is_wrong_with_a_bad_cloud(change, kind):
    records, fields = xyz_records(RNG.normal(size=(10, 3)), {"intensity": np.ones(10)})
    msg = msg_from(records, fields)
    change(msg)
    with pytest.raises(CloudError) as err:
        read_cloud(msg)
    assert err.value.kind == kind


def test_codec_round_trip_with_sensor_msgs_py():
    point_cloud2 = pytest.importorskip("sensor_msgs_py.point_cloud2", reason="sensor_msgs_py comes from "
                                       "../shared/ros2_python (scripts/setup.sh)")
    pytest.importorskip("rclpy")
    from sensor_msgs.msg import PointField
    from std_msgs.msg import Header

    xyz = RNG.normal(size=(50, 3)).astype(np.float32)
    fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, n in enumerate(["x", "y", "z", "intensity"])]
    pts = np.hstack([xyz, np.arange(50, dtype=np.float32)[:, None]])
    msg = point_cloud2.create_cloud(Header(frame_id="lidar"), fields, pts.tolist())
    cloud = read_cloud(msg)
    np.testing.assert_array_equal(cloud.xyz, xyz)
    labels = (np.arange(50) % 11).astype(np.uint8)
    prob = np.linspace(0, 1, 50, dtype=np.float32)
    records, out_fields = labeled_records(cloud, labels, prob, keep=labels != 3)
    out = cloud_message(records, out_fields, msg.header, is_bigendian=cloud.is_bigendian)
    back = point_cloud2.read_points(out, field_names=["x", "intensity", "label", "probability"])
    keep = labels != 3
    np.testing.assert_array_equal(back["x"], xyz[keep, 0])
    np.testing.assert_array_equal(back["intensity"], np.arange(50)[keep])
    np.testing.assert_array_equal(back["label"], labels[keep])
    np.testing.assert_array_equal(back["probability"], prob[keep])


def test_painting_benchmark_command_prints_every_case(capsys):
    import json

    from ecmnet_core.cli import main as cli

    assert cli(["bench", "--points", "3000", "--size", "120", "160", "--runs", "2", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["points"] == 3000 and result["label_size"] == [120, 160]
    assert set(result["cases"]) == {"raw (K, D)", "raw + probability", "rectified (R, P)", "two cameras"}
    assert all(c["median_ms"] > 0 and c["runs"] == 2 for c in result["cases"].values())
