"""Point painting: give each LiDAR point the class of the pixel it projects to (PointPainting), without ROS.

``paint_points`` projects one cloud into one or more cameras' label images; ``CloudMatcher`` pairs each cloud
with the label images whose stamps are nearest to the cloud's, within a tolerance, waiting briefly for labels
still being computed. The node and rosbag replay both use these two, so what the node publishes can be tested
without ROS.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ecmnet_core.data.classes import UNLABELED
from ecmnet_core.points.camera import CameraModel


@dataclass(frozen=True)
class LabelFrame:
    """One camera's segmentation: (H, W) uint8 ``labels`` (optional (H, W) float ``confidence``), its stamp,
    optical ``frame_id`` and camera model (at any size; scaled to the labels when they differ)."""

    stamp_ns: int
    labels: np.ndarray
    camera: CameraModel
    frame_id: str = ""
    confidence: np.ndarray | None = None


@dataclass
class PaintResult:
    """Per point: ``labels`` (N,) uint8 (255 = not painted), ``probability`` (N,) float32 (0 where not painted)
    when confidences were given, and how many points were non-finite."""

    labels: np.ndarray
    probability: np.ndarray | None = None
    nonfinite: int = 0

    @property
    def painted(self) -> int:
        return int(np.count_nonzero(self.labels != UNLABELED))


def rigid_transform(matrix: Any) -> np.ndarray:
    """A 4x4 (or 16 numbers, row-major) rigid transform, checked: orthonormal rotation, last row (0, 0, 0, 1)."""
    m = np.asarray(matrix, np.float64)
    if m.size != 16:
        raise ValueError(f"a transform needs 16 numbers (4x4, row-major), got {m.size}")
    m = m.reshape(4, 4)
    if not np.isfinite(m).all() or not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"transform's last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    r = m[:3, :3]
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) < 0:
        raise ValueError(f"transform's rotation is not orthonormal: {r.tolist()}")
    return m


def transform_from_quaternion(translation: Any, quaternion: Any) -> np.ndarray:
    """4x4 from a translation (x, y, z) and a unit quaternion (x, y, z, w), as ``geometry_msgs/Transform``."""
    x, y, z, w = (float(v) for v in quaternion)
    n = np.sqrt(x * x + y * y + z * z + w * w)
    if not n > 0:
        raise ValueError(f"quaternion {[x, y, z, w]} has zero length")
    x, y, z, w = x / n, y / n, z / n, w / n
    m = np.eye(4)
    m[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                 [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                 [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    m[:3, 3] = [float(v) for v in translation]
    return m


def paint_points(xyz: np.ndarray, views: list[tuple[LabelFrame, np.ndarray]], rectified: bool = False,
                 min_depth: float = 0.0) -> PaintResult:
    """Paint (N, 3) points with the labels of ``views``: (label frame, 4x4 cloud-frame -> camera transform).

    A point takes the class of the pixel its projection falls in (nearest pixel); the first view that sees it
    wins (cameras in the order given). Points outside every image, behind every camera or non-finite get 255.
    There is no occlusion test: a point hidden behind an object takes that object's class, as in PointPainting.
    """
    pts = np.asarray(xyz)
    n = pts.shape[0]
    out = np.full(n, UNLABELED, np.uint8)
    with_prob = any(frame.confidence is not None for frame, _ in views)
    prob = np.zeros(n, np.float32) if with_prob else None
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    todo = np.flatnonzero(finite)
    for frame, transform in views:
        if todo.size == 0:
            break
        h, w = frame.labels.shape
        camera = frame.camera.scaled(w, h)
        cam = _apply(transform, x[todo], y[todo], z[todo])
        front = np.flatnonzero(cam[:, 2] > min_depth)  # most of a 360-degree scan is behind a camera
        uv, valid = camera.project(cam[front], rectified=rectified, min_depth=min_depth)
        u, v = uv[:, 0], uv[:, 1]
        with np.errstate(invalid="ignore"):
            valid &= (u >= -0.5) & (u < w - 0.5) & (v >= -0.5) & (v < h - 0.5)
        hit = np.flatnonzero(valid)
        # nearest pixel: u in [c - 0.5, c + 0.5) is column c (u + 0.5 >= 0 here, so truncation is floor)
        c = (u[hit] + 0.5).astype(np.intp)
        r = (v[hit] + 0.5).astype(np.intp)
        idx = todo[front[hit]]
        out[idx] = frame.labels[r, c]
        if prob is not None and frame.confidence is not None:
            prob[idx] = frame.confidence[r, c]
        seen = np.zeros(todo.size, bool)
        seen[front[hit]] = True
        todo = todo[~seen]
    if prob is not None:
        prob[out == UNLABELED] = 0.0
    return PaintResult(labels=out, probability=prob, nonfinite=int(n - np.count_nonzero(finite)))


def _apply(transform: Any, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(N, 3) = rotation @ (x, y, z) + translation, column by column in the points' dtype (a BLAS call on an
    (N, 3) @ (3, 3) product costs ten times more for 100k points)."""
    (r0, r1, r2, t0), (r3, r4, r5, t1), (r6, r7, r8, t2) = np.asarray(transform, np.float64)[:3].tolist()
    out = np.empty((x.shape[0], 3), x.dtype)
    out[:, 0] = r0 * x + r1 * y + r2 * z + t0
    out[:, 1] = r3 * x + r4 * y + r5 * z + t1
    out[:, 2] = r6 * x + r7 * y + r8 * z + t2
    return out


def class_shares(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, int]:
    """Counts of painted points per class ((num_classes,) int64) and the count of unpainted points."""
    counts = np.bincount(labels, minlength=256)
    return counts[:num_classes].astype(np.int64), int(counts[UNLABELED])


# -------------------------------------------------------------------------------------------- stamp matching
@dataclass
class PendingCloud:
    """A cloud waiting for its label frames: ``item`` is the caller's (the decoded cloud and its header)."""

    item: Any
    stamp_ns: int
    arrived: float


@dataclass
class Match:
    """A cloud and, per camera key, the nearest label frame within the tolerance (missing keys: none)."""

    item: Any
    stamp_ns: int
    frames: dict[Any, LabelFrame] = field(default_factory=dict)


class CloudMatcher:
    """Pairs clouds with label frames by stamp (thread-safe; the node feeds it from several threads).

    Each camera (``key``) keeps its newest ``history`` label frames. A cloud is decided when every camera has a
    label frame stamped at or after the cloud (later frames can only be farther), or when it has waited
    ``wait_s`` (then with what there is). A camera whose nearest frame is more than ``tolerance_s`` away does
    not paint the cloud; a cloud no camera matched is returned with no frames (the caller counts it). At most
    ``max_pending`` clouds wait; older ones are decided early.
    """

    def __init__(self, keys: list[Any], tolerance_s: float = 0.05, wait_s: float = 0.5, history: int = 8,
                 max_pending: int = 4) -> None:
        if not keys:
            raise ValueError("CloudMatcher needs at least one camera")
        self.keys = list(keys)
        self.tolerance_ns = int(round(tolerance_s * 1e9))
        self.wait_s = float(wait_s)
        self._frames: dict[Any, deque[LabelFrame]] = {k: deque(maxlen=max(1, history)) for k in self.keys}
        self._pending: deque[PendingCloud] = deque()
        self.max_pending = max(1, max_pending)
        self._lock = threading.Lock()

    def configure(self, tolerance_s: float, wait_s: float) -> None:
        """Change the tolerance and the wait (live parameters); applies to the next decision."""
        with self._lock:
            self.tolerance_ns = int(round(tolerance_s * 1e9))
            self.wait_s = float(wait_s)

    def add_labels(self, key: Any, frame: LabelFrame, now: float) -> list[Match]:
        """Record one camera's labels; returns the clouds this decides."""
        with self._lock:
            self._frames[key].append(frame)
            return self._decide(now)

    def add_cloud(self, item: Any, stamp_ns: int, now: float) -> list[Match]:
        """Queue a cloud; returns the clouds decided now (this one included when its labels are already in)."""
        with self._lock:
            self._pending.append(PendingCloud(item, int(stamp_ns), now))
            return self._decide(now)

    def expire(self, now: float) -> list[Match]:
        """Decide the clouds that have waited ``wait_s`` (call periodically)."""
        with self._lock:
            return self._decide(now)

    def flush(self) -> list[Match]:
        """Decide every waiting cloud now (end of a bag, deactivate)."""
        with self._lock:
            return self._decide(float("inf"))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _final(self, cloud: PendingCloud) -> bool:
        return all(frames and frames[-1].stamp_ns >= cloud.stamp_ns for frames in self._frames.values())

    def _decide(self, now: float) -> list[Match]:
        done: list[Match] = []
        keep: deque[PendingCloud] = deque()
        excess = len(self._pending) - self.max_pending
        for i, cloud in enumerate(self._pending):
            if i < excess or self._final(cloud) or now - cloud.arrived >= self.wait_s:
                done.append(self._match(cloud))
            else:
                keep.append(cloud)
        self._pending = keep
        return done

    def _match(self, cloud: PendingCloud) -> Match:
        match = Match(cloud.item, cloud.stamp_ns)
        for key, frames in self._frames.items():
            if not frames:
                continue
            best = min(frames, key=lambda f: abs(f.stamp_ns - cloud.stamp_ns))
            if abs(best.stamp_ns - cloud.stamp_ns) <= self.tolerance_ns:
                match.frames[key] = best
        return match
