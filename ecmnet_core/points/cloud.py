"""``sensor_msgs/PointCloud2`` <-> numpy, without ROS: read x/y/z of any cloud layout, write labelled clouds.

Works on rclpy and ``rosbags`` messages alike (fields ``height``, ``width``, ``fields``, ``is_bigendian``,
``point_step``, ``row_step``, ``data``). Organized clouds (``height > 1``) and rows padded beyond
``width * point_step`` are handled; x, y, z may be float32 or float64, in either byte order.

The labelled output keeps every input field byte for byte and appends ``label`` (uint8, 255 = not painted) and
optionally ``probability`` (float32), as ``sensor_msgs_py.point_cloud2.create_cloud`` would lay them out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

#: sensor_msgs/PointField datatype -> numpy type
POINT_FIELD_TYPES = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16, 5: np.int32, 6: np.uint32,
                     7: np.float32, 8: np.float64}
UINT8, FLOAT32 = 2, 7
LABEL_FIELD, PROBABILITY_FIELD = "label", "probability"
NATIVE_BIGENDIAN = sys.byteorder == "big"


class CloudError(ValueError):
    """A PointCloud2 that cannot be read. ``kind`` (fields, point_step, size) names the problem for counters."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Field:
    """One ``sensor_msgs/PointField``."""

    name: str
    offset: int
    datatype: int
    count: int = 1

    @property
    def nbytes(self) -> int:
        return np.dtype(POINT_FIELD_TYPES[self.datatype]).itemsize * self.count


@dataclass
class Cloud:
    """A decoded cloud: ``records`` (N, point_step) uint8, the points' bytes; ``xyz`` (N, 3) float32/float64."""

    records: np.ndarray
    xyz: np.ndarray
    fields: list[Field]
    height: int
    width: int
    is_bigendian: bool

    @property
    def point_step(self) -> int:
        return int(self.records.shape[1])

    def __len__(self) -> int:
        return int(self.records.shape[0])


def _fields(msg: Any) -> list[Field]:
    out = []
    for f in msg.fields:
        if int(f.datatype) not in POINT_FIELD_TYPES:
            raise CloudError("fields", f"field {f.name!r} has an unknown datatype {f.datatype}")
        out.append(Field(str(f.name), int(f.offset), int(f.datatype), int(f.count)))
    return out


def read_cloud(msg: Any, max_points: int | None = None) -> Cloud:
    """Check and decode a PointCloud2; :class:`CloudError` says what is wrong (nothing is guessed)."""
    fields, records = check_cloud(msg, max_points)
    by_name = {f.name: f for f in fields}
    n, big = len(records), bool(msg.is_bigendian)
    dtypes = {by_name[a].datatype for a in "xyz"}
    out_type = np.float32 if dtypes == {7} else np.float64
    xyz = np.empty((n, 3), out_type)
    for i, a in enumerate("xyz"):
        f = by_name[a]
        t = np.dtype(POINT_FIELD_TYPES[f.datatype]).newbyteorder(">" if big else "<")
        xyz[:, i] = records[:, f.offset: f.offset + t.itemsize].copy().view(t).ravel()
    return Cloud(records=records, xyz=xyz, fields=fields, height=int(msg.height), width=int(msg.width),
                 is_bigendian=big)


def check_cloud(msg: Any, max_points: int | None = None) -> tuple[list[Field], np.ndarray]:
    """Validate a PointCloud2 (float x, y, z; fields inside the point; sizes that fit the data) and return its
    fields and its points' bytes, (N, point_step) uint8 without row padding. :class:`CloudError` otherwise."""
    height, width = int(msg.height), int(msg.width)
    step, row_step = int(msg.point_step), int(msg.row_step)
    fields = _fields(msg)
    by_name = {f.name: f for f in fields}
    missing = [n for n in "xyz" if n not in by_name]
    if missing:
        raise CloudError("fields", f"no {'/'.join(missing)} field (fields: {[f.name for f in fields] or 'none'})")
    for n in "xyz":
        f = by_name[n]
        if f.datatype not in (7, 8) or f.count != 1:
            raise CloudError("fields", f"field {n!r} must be one float32 or float64, got datatype {f.datatype} "
                                       f"count {f.count}")
    for f in fields:
        if f.offset < 0 or f.offset + f.nbytes > step:
            raise CloudError("point_step", f"point_step {step} is too small for field {f.name!r} at offset "
                                           f"{f.offset} ({f.nbytes} bytes)")
    n = height * width
    if max_points is not None and n > max_points:
        raise CloudError("size", f"{height}x{width} = {n} points, more than the limit {max_points}")
    if row_step < width * step:
        raise CloudError("size", f"row_step {row_step} < width {width} x point_step {step}")
    data = np.frombuffer(msg.data, np.uint8) if len(msg.data) else np.zeros(0, np.uint8)
    if data.size < row_step * height:
        raise CloudError("size", f"data has {data.size} bytes, {height} rows of row_step {row_step} need "
                                 f"{row_step * height}")
    rows = data[: row_step * height].reshape(height, row_step) if height else data[:0].reshape(0, row_step)
    return fields, np.ascontiguousarray(rows[:, : width * step]).reshape(n, step)


def _align(n: int, to: int = 4) -> int:
    return -(-n // to) * to


def labeled_records(cloud: Cloud, labels: np.ndarray, probability: np.ndarray | None = None,
                    keep: np.ndarray | None = None) -> tuple[np.ndarray, list[Field]]:
    """The cloud's points with ``label`` (and ``probability``) appended: ((M, step') uint8, fields).

    ``keep`` (N,) bool drops points (``~/points_filtered``). Input fields named ``label``/``probability``
    are replaced (their bytes stay as padding). The new fields use the cloud's byte order.
    """
    n, step = len(cloud), cloud.point_step
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    fields = [f for f in cloud.fields if f.name not in (LABEL_FIELD, PROBABILITY_FIELD)]
    fields.append(Field(LABEL_FIELD, step, UINT8))
    end = step + 1
    if probability is not None:
        fields.append(Field(PROBABILITY_FIELD, _align(end), FLOAT32))
        end = _align(end) + 4
    new_step = _align(end)
    records, labels = cloud.records, labels
    if keep is not None:
        records, labels = records[keep], labels[keep]
        probability = probability[keep] if probability is not None else None
    out = np.zeros((records.shape[0], new_step), np.uint8)
    out[:, :step] = records
    out[:, step] = labels
    if probability is not None:
        t = np.dtype(np.float32).newbyteorder(">" if cloud.is_bigendian else "<")
        offset = fields[-1].offset
        out[:, offset: offset + 4] = probability.astype(t).view(np.uint8).reshape(-1, 4)
    return out, fields


def cloud_message(records: np.ndarray, fields: list[Field], header: Any, height: int = 1,
                  is_bigendian: bool = NATIVE_BIGENDIAN,
                  msg_type: Any = None, field_type: Any = None) -> Any:
    """(N, point_step) uint8 point bytes -> ``sensor_msgs/PointCloud2`` (``height`` rows of N / height points).

    ``msg_type``/``field_type``: message classes to build (default rclpy's ``sensor_msgs.msg``; ``rosbags``
    classes also work and get ``data`` as a uint8 array).
    """
    n, step = records.shape
    height = height if height > 0 and n % height == 0 and n else 1
    width = n // height
    values = dict(height=height, width=width, is_bigendian=bool(is_bigendian), point_step=int(step),
                  row_step=int(step * width), is_dense=False)
    data = np.ascontiguousarray(records).reshape(-1)
    if msg_type is None:
        from sensor_msgs.msg import PointCloud2, PointField  # imported here: decoding needs no ROS

        pf = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in fields]
        return PointCloud2(header=header, fields=pf, data=data.tobytes(), **values)
    pf = [field_type(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in fields]
    return msg_type(header=header, fields=pf, data=data, **values)


def xyz_records(xyz: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[Field]]:
    """(N, 3) float points (+ float32 per-point ``extra`` fields, e.g. intensity) -> native-order float32
    records and fields, for synthetic clouds (make-bag, tests, benchmarks)."""
    columns = [np.asarray(xyz, np.float32)] + [np.asarray(v, np.float32).reshape(-1, 1) for v in (extra or {}).values()]
    table = np.ascontiguousarray(np.hstack(columns))
    names = ["x", "y", "z", *(extra or {})]
    fields = [Field(name, 4 * i, FLOAT32) for i, name in enumerate(names)]
    return table.view(np.uint8).reshape(len(table), -1), fields

