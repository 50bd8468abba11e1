"""PointCloud2 in the node through ``sensor_msgs_py.point_cloud2`` (``read_points``, ``create_cloud``), the way
ROS 2 Python nodes read and write clouds. The core codec (:mod:`ecmnet_core.points.cloud`) validates every cloud
first, so bad clouds are rejected with the same kind as offline, and it stays the codec where ROS is absent (bags,
offline replay). Two things ``sensor_msgs_py`` does not do are handled here: it ignores ``row_step`` (row padding
of organized clouds is dropped before reading) and it byte-swaps big-endian data in the message's own buffer (such
clouds are read from a copy). ``test_ros_clouds.py`` feeds the same clouds through both and compares.

Cost of both for one cloud: ``python -m ecmnet_ros.clouds [--points N]``.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import numpy as np
from numpy.lib.recfunctions import structured_to_unstructured
from sensor_msgs.msg import PointCloud2, PointField
from sensor_msgs_py import point_cloud2

from ecmnet_core.points.cloud import Cloud, Field, check_cloud, cloud_message


def read_ros_cloud(msg: PointCloud2, max_points: int | None = None) -> Cloud:
    """A PointCloud2 as a :class:`Cloud` (the points' bytes and their x, y, z), read with ``read_points``."""
    fields, records = check_cloud(msg, max_points)
    width, height, step = int(msg.width), int(msg.height), int(msg.point_step)
    view = msg
    if int(msg.row_step) != width * step or msg.is_bigendian:
        # read_points assumes packed rows and byte-swaps big-endian data in place: give it a packed copy
        view = copy.copy(msg)
        view.data, view.row_step = records.tobytes(), width * step
    xyz = point_cloud2.read_points(view, field_names=("x", "y", "z"), skip_nans=False)
    types = {f.datatype for f in fields if f.name in ("x", "y", "z")}
    xyz = structured_to_unstructured(xyz, dtype=np.float32 if types == {PointField.FLOAT32} else np.float64)
    return Cloud(records=records, xyz=xyz.reshape(-1, 3), fields=fields, height=height, width=width,
                 is_bigendian=bool(msg.is_bigendian))


def ros_cloud_message(records: np.ndarray, fields: list[Field], header: Any, height: int = 1,
                      is_bigendian: bool = False) -> PointCloud2:
    """(N, point_step) uint8 point bytes -> PointCloud2 built by ``create_cloud`` (``height`` rows when it divides
    N). The bytes are written as they are, in the cloud's byte order; fields ``create_cloud`` cannot describe
    (two fields of one name) go through the core's :func:`cloud_message` instead."""
    n, step = records.shape
    height = height if height > 0 and n % height == 0 and n else 1
    pf = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in fields]
    try:
        dtype = point_cloud2.dtype_from_fields(pf, step)
    except AssertionError:  # duplicate field names
        return cloud_message(records, fields, header, height, is_bigendian)
    points = np.ascontiguousarray(records).view(dtype).reshape(n)
    if height > 1:
        points = points.reshape(n // height, height)  # create_cloud's (width, height) shape; the order is kept
    msg = point_cloud2.create_cloud(header, pf, points, point_step=step)
    msg.is_bigendian = bool(is_bigendian)  # create_cloud stamps the machine's order on bytes it copies as is
    msg.is_dense = False
    return msg


def bench(points: int = 100_000, runs: int = 30) -> list[tuple[str, float]]:
    """Median ms to read one cloud (x, y, z, intensity float32) and to write its labelled copy, with
    ``sensor_msgs_py`` and with the core codec."""
    import torch

    from ecmnet_core.bench.timing import time_fn
    from ecmnet_core.points.cloud import labeled_records, read_cloud, xyz_records
    from ecmnet_ros.runtime import make_header

    rng = np.random.default_rng(0)
    records, fields = xyz_records(rng.normal(size=(points, 3)) * 20, {"intensity": rng.random(points)})
    msg = cloud_message(records, fields, make_header(1, "lidar"))
    cloud = read_cloud(msg)
    labels = rng.integers(0, 11, points).astype(np.uint8)
    out, out_fields = labeled_records(cloud, labels, rng.random(points).astype(np.float32))
    cases = {"read, sensor_msgs_py": lambda: read_ros_cloud(msg), "read, core codec": lambda: read_cloud(msg),
             "write, sensor_msgs_py": lambda: ros_cloud_message(out, out_fields, msg.header),
             "write, core codec": lambda: cloud_message(out, out_fields, msg.header)}
    cpu = torch.device("cpu")
    return [(name, time_fn(fn, runs, warmup=1, device=cpu).median) for name, fn in cases.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecmnet_ros.clouds", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000, help="points per cloud (default 100000)")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per figure (median)")
    args = parser.parse_args(argv)
    for name, ms in bench(args.points, args.runs):
        print(f"{args.points:,} points  {name:<24} {ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
