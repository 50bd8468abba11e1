"""A built-in camera for demos and benchmarks, in the manner of ROS's ``cam2image``: a moving street-like test
pattern (sky, buildings scrolling past, a road with moving lane marks, trees, a pole, a car crossing) published as
``sensor_msgs/Image`` bgr8 with a matching ``CameraInfo``."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from ecmnet_core.image_messages import array_to_image


class StreetPattern:
    """Deterministic street scene; ``frame(i)`` is frame ``i`` of the animation as (H, W, 3) BGR uint8."""

    def __init__(self, height: int = 360, width: int = 480, seed: int = 0) -> None:
        if height < 32 or width < 32:
            raise ValueError(f"StreetPattern: size {height}x{width} is too small (minimum 32x32)")
        self.height, self.width = height, width
        rng = np.random.default_rng(seed)
        self.horizon = int(height * 0.45)
        # a panorama of buildings and trees twice the frame width; it scrolls to the left
        pano_w = 2 * width
        pano = np.zeros((self.horizon, pano_w, 3), np.uint8)
        sky = np.linspace(235, 170, self.horizon, dtype=np.float32)[:, None]
        pano[:] = np.stack([sky + 10, sky - 15, sky - 60], axis=-1).clip(0, 255).astype(np.uint8)[:, :, :]
        x = 0
        while x < pano_w:
            w = int(rng.integers(width // 10, width // 4))
            top = int(rng.integers(self.horizon // 6, self.horizon * 2 // 3))
            colour = tuple(int(c) for c in rng.integers(60, 150, 3))
            if rng.random() < 0.25:  # a tree instead of a building
                cx, r = x + w // 2, w // 2
                cv2.rectangle(pano, (cx - 3, self.horizon - r), (cx + 3, self.horizon), (30, 60, 90), -1)
                cv2.circle(pano, (cx, self.horizon - r), r, (40, int(rng.integers(110, 160)), 50), -1)
            else:
                cv2.rectangle(pano, (x, top), (x + w - 2, self.horizon), colour, -1)
                for wy in range(top + 6, self.horizon - 8, 14):
                    for wx in range(x + 5, x + w - 10, 12):
                        cv2.rectangle(pano, (wx, wy), (wx + 5, wy + 7), (200, 220, 230), -1)
            x += w
        self.panorama = pano

    def frame(self, index: int) -> np.ndarray:
        h, w, hz = self.height, self.width, self.horizon
        img = np.empty((h, w, 3), np.uint8)
        shift = (index * 4) % self.panorama.shape[1]
        img[:hz] = np.roll(self.panorama, -shift, axis=1)[:, :w]
        img[hz:] = (90, 90, 95)  # asphalt
        # pavement wedges on both sides and the road edges converging at the vanishing point
        vx = w // 2
        cv2.fillPoly(img, [np.array([(0, hz), (vx - w // 10, hz), (0, h - h // 6)])], (150, 160, 175))
        cv2.fillPoly(img, [np.array([(w, hz), (vx + w // 10, hz), (w, h - h // 6)])], (150, 160, 175))
        # dashed centre line moving towards the viewer
        for k in range(8):
            t0 = ((k / 8) + (index * 0.02)) % 1.0
            t1 = min(t0 + 0.05, 1.0)
            y0, y1 = hz + int((h - hz) * t0 ** 2), hz + int((h - hz) * t1 ** 2)
            half0, half1 = max(1, int(1 + 6 * t0)), max(1, int(1 + 6 * t1))
            cv2.fillPoly(img, [np.array([(vx - half0, y0), (vx + half0, y0), (vx + half1, y1), (vx - half1, y1)])],
                         (235, 235, 235))
        # a pole on the right and a car crossing the road
        px = int(w * 0.82)
        cv2.rectangle(img, (px, hz - h // 4), (px + 3, hz + h // 8), (70, 80, 90), -1)
        phase = (index % 120) / 120.0
        cx = int(-w * 0.3 + phase * w * 1.6)
        cy = hz + (h - hz) // 3
        cw, ch = w // 5, h // 9
        cv2.rectangle(img, (cx, cy - ch), (cx + cw, cy), (40, 30, 160), -1)
        cv2.rectangle(img, (cx + cw // 5, cy - ch - ch // 2), (cx + cw * 4 // 5, cy - ch), (60, 50, 170), -1)
        for wx in (cx + cw // 5, cx + cw * 4 // 5):
            cv2.circle(img, (wx, cy), max(2, ch // 3), (20, 20, 20), -1)
        cv2.putText(img, f"ecmnet #{index}", (8, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        return img


def camera_info(height: int, width: int, fov_deg: float = 70.0) -> CameraInfo:
    """A pinhole CameraInfo for the synthetic camera (no distortion)."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    info = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
    info.d = [0.0] * 5
    info.k = [f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [f, 0.0, width / 2, 0.0, 0.0, f, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


class SyntheticCamera(Node):
    """Publishes :class:`StreetPattern` frames at ``rate`` Hz on ``<topic>`` and ``camera_info`` next to it.

    Frames carry the node clock's stamp and ``frame_id``; ``published`` maps stamp (ns) -> ``time.monotonic()``
    at publish, so a consumer can measure end-to-end latency.
    """

    def __init__(self, topic: str = "/camera/image_raw", rate: float = 10.0, size: tuple[int, int] = (360, 480),
                 frame_id: str = "camera", reliable: bool = True, frames: int | None = None, **kwargs) -> None:
        super().__init__("synthetic_camera", **kwargs)
        if rate <= 0:
            raise ValueError(f"SyntheticCamera: rate must be > 0 Hz, got {rate}")
        self.pattern = StreetPattern(*size)
        self.frame_id = frame_id
        self.limit = frames
        self.count = 0
        self.published: dict[int, float] = {}
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)
        self.image_pub = self.create_publisher(Image, topic, qos)
        base = topic.rstrip("/").rpartition("/")[0]
        self.info_pub = self.create_publisher(CameraInfo, f"{base}/camera_info" if base else "camera_info", qos)
        self.info = camera_info(*size)
        self.timer = self.create_timer(1.0 / rate, self.publish_frame)

    @property
    def done(self) -> bool:
        return self.limit is not None and self.count >= self.limit

    def publish_frame(self) -> None:
        if self.done:
            return
        image = self.pattern.frame(self.count)
        stamp = self.get_clock().now()
        msg = array_to_image(image, "bgr8")
        msg.header.stamp = stamp.to_msg()
        msg.header.frame_id = self.frame_id
        self.info.header = msg.header
        self.info_pub.publish(self.info)
        self.published[stamp.nanoseconds] = time.monotonic()
        if len(self.published) > 1000:  # bounded: keep the newest stamps only
            for key in sorted(self.published)[:500]:
                del self.published[key]
        self.image_pub.publish(msg)
        self.count += 1
