"""Point painting in offline rosbag replay: the bag's clouds painted with the predicted labels, per-class shares.

The same pieces as the node (:class:`~ecmnet_core.points.painting.CloudMatcher` on bag time,
:func:`~ecmnet_core.points.painting.paint_points`); with ground-truth labels in the bag each cloud is also painted
with them, and ``point_accuracy`` is the share of points whose predicted class equals the ground-truth class of
their pixel (points on void pixels left out).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from ecmnet_core.bags.reader import CAMERA_INFO, POINT_CLOUD2, BagError, BagMessage, BagReader
from ecmnet_core.points.camera import CameraModel, CameraModelError
from ecmnet_core.points.cloud import CloudError, read_cloud
from ecmnet_core.points.painting import UNLABELED, CloudMatcher, LabelFrame, paint_points, rigid_transform


def _only_topic(reader: BagReader, msgtype: str) -> str | None:
    found = [t.name for t in reader.topics.values() if t.msgtype == msgtype]
    return found[0] if len(found) == 1 else None


class PointsReplay:
    """Paints the clouds of ``points_topic`` during an offline replay and tallies the classes."""

    def __init__(self, reader: BagReader, class_names: list[str], points_topic: str, camera_info_topic: str,
                 lidar_to_camera: Any, tolerance_s: float = 0.05) -> None:
        self.class_names = class_names
        self.points_topic, self.camera_info_topic = points_topic, camera_info_topic
        self.transform = rigid_transform(lidar_to_camera)
        self.matcher = CloudMatcher([0], tolerance_s=tolerance_s, wait_s=5.0)  # bag seconds
        self.camera: CameraModel | None = None
        self.counts = np.zeros(len(class_names), np.int64)
        self.unpainted = 0
        self.clouds = self.painted_clouds = self.unmatched = self.bad = 0
        self.points = self.nonfinite = 0
        self.agree = self.compared = 0
        self._gt: OrderedDict[int, np.ndarray] = OrderedDict()
        self._early: list[tuple[int, int, np.ndarray]] = []

    @classmethod
    def from_bag(cls, reader: BagReader, class_names: list[str], points_topic: str | None = None,
                 lidar_to_camera: Any = None, tolerance_s: float = 0.05) -> PointsReplay | None:
        """None when painting is off (``points_topic`` "" or no cloud topic); BagError when something is missing."""
        meta = reader.custom_data
        if points_topic == "":
            return None
        topic = points_topic or meta.get("points_topic") or _only_topic(reader, POINT_CLOUD2)
        if not topic:
            return None
        reader.require_topic(topic, (POINT_CLOUD2,), "point cloud topic")
        info = meta.get("camera_info_topic") or _only_topic(reader, CAMERA_INFO)
        if not info:
            raise BagError(f"bag {reader.path}: painting {topic} needs a CameraInfo topic, the bag has none")
        reader.require_topic(info, (CAMERA_INFO,), "camera_info topic")
        matrix = lidar_to_camera if lidar_to_camera is not None else meta.get("lidar_to_camera")
        if matrix is None:
            raise BagError(f"bag {reader.path}: painting {topic} needs the LiDAR -> camera transform "
                           "(--lidar-to-camera, 16 numbers row-major)")
        try:
            return cls(reader, class_names, topic, info, matrix, tolerance_s)
        except ValueError as exc:
            raise BagError(f"--lidar-to-camera: {exc}") from None

    @property
    def topics(self) -> list[str]:
        return [self.points_topic, self.camera_info_topic]

    # ------------------------------------------------------------------------------------------------ input
    def on_message(self, msg: BagMessage, reader: BagReader) -> None:
        """A message of :attr:`topics` (cloud or camera_info)."""
        if msg.topic == self.camera_info_topic:
            try:
                self.camera = CameraModel.from_camera_info(msg.msg)
            except CameraModelError as exc:
                reader.skip(msg, f"unusable CameraInfo ({exc})")
                return
            early, self._early = self._early, []
            for stamp_ns, t_ns, pred in early:  # predictions made before the first camera_info
                self.on_prediction(stamp_ns, t_ns, pred)
            return
        self.clouds += 1
        try:
            cloud = read_cloud(msg.msg)
        except CloudError as exc:
            self.bad += 1
            reader.skip(msg, f"bad PointCloud2 ({exc.kind}: {exc})")
            return
        self._paint(self.matcher.add_cloud(cloud.xyz, msg.stamp_ns or 0, msg.t_ns / 1e9))

    def on_prediction(self, stamp_ns: int, t_ns: int, pred: np.ndarray) -> None:
        if self.camera is None:  # camera_info is usually recorded just after its image
            self._early = [*self._early[-3:], (stamp_ns, t_ns, pred)]
            return
        self._paint(self.matcher.add_labels(0, LabelFrame(stamp_ns, pred, self.camera), t_ns / 1e9))

    def on_ground_truth(self, stamp_ns: int, gt: np.ndarray) -> None:
        self._gt[stamp_ns] = gt
        while len(self._gt) > 16:
            self._gt.popitem(last=False)

    def finish(self) -> None:
        self._paint(self.matcher.flush())

    def _paint(self, matches: list) -> None:
        for match in matches:
            frame = match.frames.get(0)
            if frame is None:
                self.unmatched += 1
                continue
            result = paint_points(match.item, [(frame, self.transform)])
            counts = np.bincount(result.labels, minlength=256)
            self.counts += counts[: len(self.class_names)]
            self.unpainted += int(counts[UNLABELED])
            self.painted_clouds += 1
            self.points += len(result.labels)
            self.nonfinite += result.nonfinite
            gt = self._gt.get(frame.stamp_ns)
            if gt is not None and gt.shape == frame.labels.shape:
                truth = paint_points(match.item, [(LabelFrame(frame.stamp_ns, gt, frame.camera), self.transform)])
                valid = (truth.labels != UNLABELED) & (result.labels != UNLABELED)
                self.compared += int(valid.sum())
                self.agree += int((truth.labels[valid] == result.labels[valid]).sum())

    # ----------------------------------------------------------------------------------------------- output
    def summary(self) -> dict[str, Any]:
        painted = int(self.counts.sum())
        share = {n: (float(c) / painted * 100.0 if painted else None) for n, c in zip(self.class_names, self.counts)}
        return {"points_topic": self.points_topic, "camera_info_topic": self.camera_info_topic,
                "clouds": self.clouds, "clouds_painted": self.painted_clouds, "clouds_unmatched": self.unmatched,
                "clouds_bad": self.bad, "points": self.points, "points_painted": painted,
                "points_unpainted": self.unpainted, "points_nonfinite": self.nonfinite,
                "painted_share_percent": share,
                "point_accuracy": self.agree / self.compared if self.compared else None,
                "points_compared_with_ground_truth": self.compared}

    def format_text(self) -> str:
        s = self.summary()
        lines = [f"points {s['points_topic']}: {s['clouds_painted']}/{s['clouds']} clouds painted "
                 f"({s['clouds_unmatched']} without labels within the stamp tolerance, {s['clouds_bad']} bad), "
                 f"{s['points_painted']:,} of {s['points']:,} points in the image"]
        shares = ", ".join(f"{n} {v:.1f} %" for n, v in s["painted_share_percent"].items() if v)
        lines.append(f"painted points per class: {shares or 'none'}")
        if s["point_accuracy"] is not None:
            lines.append(f"point accuracy against ground truth: {s['point_accuracy'] * 100:.2f} % of "
                         f"{s['points_compared_with_ground_truth']:,} points")
        return "\n".join(lines)
