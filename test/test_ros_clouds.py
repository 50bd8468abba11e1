"""The node's PointCloud2 reading and writing through sensor_msgs_py against the core codec: the same points,
fields and bytes for every layout the semantic-points tests use (unorganized, organized with row padding,
big-endian float64 with extra fields, NaN points, replaced label fields), the same rejection kinds for bad
clouds, and the same painted output."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("sensor_msgs_py", reason="sensor_msgs_py comes from ../shared/ros2_python")
pytestmark = pytest.mark.ros

from sensor_msgs.msg import PointCloud2, PointField  # noqa: E402
from sensor_msgs_py import point_cloud2  # noqa: E402

from ecmnet_core.points.cloud import CloudError, Field, cloud_message, labeled_records, read_cloud, xyz_records  # noqa: E402
from ecmnet_ros.clouds import read_ros_cloud, ros_cloud_message  # noqa: E402
from ecmnet_ros.runtime import make_header  # noqa: E402

RNG = np.random.default_rng(3)


def ros_msg(records: np.ndarray, fields: list[Field], height: int = 1, big: bool = False, row_pad: int = 0):
    n, step = records.shape
    width = n // height
    rows = records.reshape(height, width * step)
    data = np.hstack([rows, np.zeros((height, row_pad), np.uint8)]).ravel()
    return PointCloud2(header=make_header(5, "lidar"), height=height, width=width, is_bigendian=big,
                       point_step=step, row_step=width * step + row_pad, is_dense=False, data=data.tobytes(),
                       fields=[PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
                               for f in fields])


def layouts():
    xyz = RNG.normal(size=(12, 3)) * 10
    flat, flat_fields = xyz_records(xyz, {"intensity": RNG.random(12)})
    nan = xyz.copy()
    nan[[1, 5]] = np.nan
    nan_rec, _ = xyz_records(nan, {"intensity": RNG.random(12)})
    big_dt = np.dtype([("x", ">f8"), ("y", ">f8"), ("z", ">f8"), ("ring", ">u2"), ("pad", "V6")])
    table = np.zeros(12, big_dt)
    table["x"], table["y"], table["z"], table["ring"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], np.arange(12)
    big_fields = [Field("x", 0, 8), Field("y", 8, 8), Field("z", 16, 8), Field("ring", 24, 4)]
    labelled = [*flat_fields, Field("label", 16, 2)]  # an input "label" field is replaced on output
    lab_rec = np.hstack([flat, RNG.integers(0, 255, (12, 4), dtype=np.uint8)])
    return {
        "unorganized float32 + intensity": ros_msg(flat, flat_fields),
        "organized 3x4 with row padding": ros_msg(flat, flat_fields, height=3, row_pad=6),
        "big-endian float64, ring, organized, padded": ros_msg(table.view(np.uint8).reshape(12, 32), big_fields,
                                                               height=3, big=True, row_pad=5),
        "NaN points": ros_msg(nan_rec, flat_fields),
        "input label field": ros_msg(lab_rec, labelled),
    }


LAYOUTS = layouts()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_same_points_and_same_painted_output(name):
    msg = LAYOUTS[name]
    before = bytes(msg.data)
    ours, core = read_ros_cloud(msg), read_cloud(msg)
    assert bytes(msg.data) == before, "reading must not modify the message"
    np.testing.assert_array_equal(ours.records, core.records)
    np.testing.assert_array_equal(ours.xyz, core.xyz)
    assert ours.xyz.dtype == core.xyz.dtype and ours.fields == core.fields
    assert (ours.height, ours.width, ours.is_bigendian) == (core.height, core.width, core.is_bigendian)
    labels = (np.arange(len(core)) % 11).astype(np.uint8)
    prob = np.linspace(0, 1, len(core), dtype=np.float32)
    for keep, height in ((None, core.height), (labels != 3, 1)):
        records, fields = labeled_records(core, labels, prob, keep)
        a = ros_cloud_message(records, fields, msg.header, height, core.is_bigendian)
        b = cloud_message(records, fields, msg.header, height, core.is_bigendian)
        for attr in ("height", "width", "is_bigendian", "point_step", "row_step", "is_dense"):
            assert getattr(a, attr) == getattr(b, attr), attr
        assert [(f.name, f.offset, f.datatype, f.count) for f in a.fields] == \
            [(f.name, f.offset, f.datatype, f.count) for f in b.fields]
        assert bytes(a.data) == bytes(b.data)
    back = point_cloud2.read_points(ros_cloud_message(*labeled_records(core, labels), msg.header),
                                    field_names=["label"])
    np.testing.assert_array_equal(back["label"], labels)


@pytest.mark.parametrize("change,kind", [
    (lambda m: m.fields.pop(2), "fields"),
    (lambda m: setattr(m.fields[0], "datatype", 5), "fields"),
    (lambda m: setattr(m, "point_step", 8), "point_step"),
    (lambda m: setattr(m, "data", bytes(m.data)[:-1]), "size"),
    (lambda m: setattr(m, "row_step", 10), "size"),
])
def test_bad_clouds_are_rejected_with_the_same_kind(change, kind):
    records, fields = xyz_records(RNG.normal(size=(10, 3)), {"intensity": np.ones(10)})
    msg = ros_msg(records, fields)
    change(msg)
    for reader in (read_ros_cloud, read_cloud):
        with pytest.raises(CloudError) as err:
            reader(msg)
        assert err.value.kind == kind


def test_the_benchmark_prints_both_codecs(capsys):
    from ecmnet_ros.clouds import main

    assert main(["--points", "500", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "read, sensor_msgs_py" in out and "write, core codec" in out
