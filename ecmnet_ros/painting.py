"""The segmenter node's point painting: PointCloud2 in, the same cloud with a ``label`` field out.

Thin around :mod:`ecmnet_core.points`: clouds are read and written with ``sensor_msgs_py``
(:mod:`ecmnet_ros.clouds`, after the core's checks), paired with label images by
:class:`~ecmnet_core.points.painting.CloudMatcher` and painted by :func:`~ecmnet_core.points.painting.paint_points`.
This module only does the ROS side: the subscription, the publishers, the LiDAR -> camera transform (TF when
``tf2_ros`` is importable, else the ``lidar_to_camera`` parameter) and the counters for ``/diagnostics``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import PointCloud2

from ecmnet_core.data.classes import UNLABELED
from ecmnet_core.points.camera import CameraModel, CameraModelError
from ecmnet_core.points.cloud import Cloud, CloudError, labeled_records
from ecmnet_core.points.painting import (
    CloudMatcher,
    LabelFrame,
    Match,
    paint_points,
    rigid_transform,
    transform_from_quaternion,
)
from ecmnet_ros.clouds import read_ros_cloud, ros_cloud_message
from ecmnet_ros.params import LiveSettings
from ecmnet_ros.runtime import stamp_ns
from ecmnet_ros.stats import ErrorCounter, LatencyWindow

POINTS_TOPIC = "points"
TICK_PERIOD_S = 0.05  # how often waiting clouds are checked against points_wait
MAX_POINTS = 10_000_000  # larger clouds are rejected (a corrupt width/height would allocate gigabytes)


class TransformUnavailable(RuntimeError):
    """No LiDAR -> camera transform for a cloud (TF has none at that stamp)."""


@dataclass
class PaintingStats:
    """Counters of the point painting, for ``/diagnostics``."""

    errors: ErrorCounter
    clouds_received: int = 0
    clouds_painted: int = 0
    clouds_unmatched: int = 0
    points_received: int = 0
    points_painted: int = 0
    points_nonfinite: int = 0
    paint_ms: LatencyWindow = field(default_factory=LatencyWindow)


class FixedTransform:
    """The ``lidar_to_camera`` parameter: one transform for every cloud and camera."""

    def __init__(self, matrix: Any) -> None:
        self.matrix = rigid_transform(matrix)

    def lookup(self, camera_frame: str, cloud_frame: str, stamp: Any) -> np.ndarray:
        return self.matrix

    describe = "lidar_to_camera parameter"


class TfTransform:
    """Transforms from TF at the cloud's stamp (``tf2_ros`` Buffer + TransformListener on the node)."""

    def __init__(self, node: Any) -> None:
        import tf2_ros  # imported here: optional, not on PyPI

        self.buffer = tf2_ros.Buffer()
        self.listener = tf2_ros.TransformListener(self.buffer, node)

    def lookup(self, camera_frame: str, cloud_frame: str, stamp: Any) -> np.ndarray:
        from rclpy.time import Time

        try:
            t = self.buffer.lookup_transform(camera_frame, cloud_frame, Time.from_msg(stamp)).transform
        except Exception as exc:  # tf2 Lookup/Extrapolation/Connectivity errors
            raise TransformUnavailable(f"no TF transform {cloud_frame!r} -> {camera_frame!r} at the cloud's "
                                       f"stamp: {exc}") from exc
        r, q = t.translation, t.rotation
        return transform_from_quaternion((r.x, r.y, r.z), (q.x, q.y, q.z, q.w))

    describe = "TF"


def transform_source(node: Any, matrix: Any, cameras: int) -> FixedTransform | TfTransform:
    """``lidar_to_camera`` when set (one camera only), else TF; ValueError says what is missing."""
    if matrix is not None and len(matrix):
        if cameras != 1:
            raise ValueError(f"lidar_to_camera is one transform but the node serves {cameras} cameras: "
                             "unset it and publish the cameras' transforms on TF")
        return FixedTransform(list(matrix))
    try:
        return TfTransform(node)
    except ImportError as exc:
        raise ValueError("paint_points needs the LiDAR -> camera transform: set the lidar_to_camera parameter "
                         f"(tf2_ros is not importable: {exc})") from exc


class PointPainter:
    """Subscribes to ``points``, pairs clouds with the cameras' labels, publishes labelled clouds.

    Created on configure (publishers), ``activate`` subscribes, ``deactivate`` unsubscribes. ``add_labels`` is
    called by the node's worker after each label image; painting runs on whichever thread decided a cloud.
    """

    def __init__(self, node: Any, cameras: int, transforms: FixedTransform | TfTransform, qos: Any,
                 warn_period_s: float, group: Any) -> None:
        self.node = node
        self.transforms = transforms
        self.stats = PaintingStats(errors=ErrorCounter(warn_period_s))
        self._warn_period_s = warn_period_s
        self._group = group
        self.matcher = CloudMatcher(list(range(cameras)))
        self.publishers = {name: node.create_lifecycle_publisher(PointCloud2, f"~/{name}", qos)
                           for name in ("points_labeled", "points_filtered")}
        self.subscription: Any = None
        self.timer: Any = None
        self.topic = node.resolve_topic_name(POINTS_TOPIC)
        self._cameras: dict[int, tuple[Any, CameraModel]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ lifecycle
    def activate(self) -> None:
        self.subscription = self.node.create_subscription(PointCloud2, POINTS_TOPIC, self.on_cloud,
                                                          qos_profile_sensor_data, callback_group=self._group)
        self.timer = self.node.create_timer(TICK_PERIOD_S, self.tick, callback_group=self._group)

    def deactivate(self) -> None:
        if self.subscription is not None:
            self.node.destroy_subscription(self.subscription)
            self.subscription = None
        if self.timer is not None:
            self.node.destroy_timer(self.timer)
            self.timer = None
        self.matcher.flush()  # waiting clouds are dropped, not painted with labels of a later activation

    def destroy(self) -> None:
        self.deactivate()
        for pub in self.publishers.values():
            self.node.destroy_lifecycle_publisher(pub)
        self.publishers = {}

    # ---------------------------------------------------------------------------------------------- input
    def on_cloud(self, msg: Any) -> None:
        with self._lock:
            self.stats.clouds_received += 1
        try:
            cloud = read_ros_cloud(msg, MAX_POINTS)
        except CloudError as exc:
            self._bad(exc.kind, str(exc))
            return
        live: LiveSettings = self.node.live_settings
        self.matcher.configure(live.points_stamp_tolerance, live.points_wait)
        stamp = stamp_ns(msg.header)
        self._paint_all(self.matcher.add_cloud((cloud, msg.header), stamp, time.monotonic()))

    def add_labels(self, camera: int, header: Any, labels: np.ndarray, confidence: np.ndarray | None,
                   camera_info: Any) -> None:
        """One camera's label image (the node's worker, after publishing ~/labels)."""
        if camera_info is None:
            self._bad("camera_info", f"no camera_info received for camera {camera} yet: its labels cannot "
                                     "paint points")
            return
        try:
            model = self._camera_model(camera, camera_info)
        except CameraModelError as exc:
            self._bad("camera_info", f"camera {camera}: {exc}")
            return
        stamp = stamp_ns(header)
        frame = LabelFrame(stamp, labels, model, header.frame_id or camera_info.header.frame_id, confidence)
        self._paint_all(self.matcher.add_labels(camera, frame, time.monotonic()))

    def tick(self) -> None:
        self._paint_all(self.matcher.expire(time.monotonic()))

    def _camera_model(self, camera: int, info: Any) -> CameraModel:
        with self._lock:  # one CameraModel per camera_info message, not per frame
            cached = self._cameras.get(camera)
            if cached is not None and cached[0] is info:
                return cached[1]
        model = CameraModel.from_camera_info(info)
        with self._lock:
            self._cameras[camera] = (info, model)
        return model

    # --------------------------------------------------------------------------------------------- output
    def _paint_all(self, matches: list[Match]) -> None:
        for match in matches:
            try:
                self._paint(match)
            except Exception as exc:  # a painting failure must not take the callback thread down
                self._bad("painting", f"painting failed: {exc!r}")

    def _paint(self, match: Match) -> None:
        cloud, header = match.item
        cloud: Cloud
        if not match.frames:
            with self._lock:  # normal at start-up and with a slow model: counted, not warned
                self.stats.clouds_unmatched += 1
            return
        live: LiveSettings = self.node.live_settings
        start = time.perf_counter()
        views = []
        for _, frame in sorted(match.frames.items()):
            try:
                views.append((frame, self.transforms.lookup(frame.frame_id, header.frame_id, header.stamp)))
            except TransformUnavailable as exc:
                self._bad("tf", str(exc))
        if not views:
            return
        result = paint_points(cloud.xyz, views, rectified=live.points_rectified)
        probability = result.probability if live.paint_probability else None
        if probability is None and live.paint_probability:
            probability = np.zeros(len(cloud), np.float32)  # labels computed before the switch: keep the layout
        records, fields = labeled_records(cloud, result.labels, probability)
        with self._lock:  # counted before publishing: whoever receives the cloud sees it counted
            s = self.stats
            s.clouds_painted += 1
            s.points_received += len(cloud)
            s.points_painted += result.painted
            s.points_nonfinite += result.nonfinite
            s.paint_ms.add((time.perf_counter() - start) * 1000.0)
        pubs = self.publishers
        pubs["points_labeled"].publish(ros_cloud_message(records, fields, header, cloud.height,
                                                           cloud.is_bigendian))
        filtered = pubs["points_filtered"]
        if filtered.get_subscription_count() > 0:
            names = list(self.node.segmenter.class_names) if self.node.segmenter is not None else []
            drop = [names.index(c) for c in live.points_filter_classes if c in names]
            if live.points_filter_unpainted:
                drop.append(UNLABELED)
            keep = ~np.isin(result.labels, drop)
            rec, fl = labeled_records(cloud, result.labels, probability, keep)
            filtered.publish(ros_cloud_message(rec, fl, header, 1, cloud.is_bigendian))

    def _bad(self, kind: str, text: str) -> None:
        if self.stats.errors.add(kind, text):
            self.node.get_logger().warning(
                f"{self.topic}: {text} ({kind}) [{self.stats.errors.counts[kind]} so far; further '{kind}' "
                f"warnings throttled to one per {self._warn_period_s:g} s]")

    # ---------------------------------------------------------------------------------------- diagnostics
    def values(self) -> dict[str, Any]:
        s = self.stats
        p50, p95 = s.paint_ms.percentiles(50, 95)
        return {"points_topic": self.topic, "transform": self.transforms.describe,
                "clouds_received": s.clouds_received, "clouds_painted": s.clouds_painted,
                "clouds_unmatched": s.clouds_unmatched, "clouds_waiting": self.matcher.pending,
                "points_received": s.points_received, "points_painted": s.points_painted,
                "points_nonfinite": s.points_nonfinite, "paint_p50_ms": p50, "paint_p95_ms": p95,
                **{f"cloud_errors_{k}": v for k, v in sorted(s.errors.counts.items())},
                "last_cloud_error": s.errors.last_message or "-"}
