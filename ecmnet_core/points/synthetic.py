"""A synthetic driving scene whose painting answer is known: ground plane, boxes, sky, and a LiDAR looking at it.

The camera looks straight ahead ``camera_height`` metres above a flat road; boxes (cars, a pedestrian) stand on
the road facing the camera. The label image is drawn by casting each pixel's ray (``cv2.undistortPoints``, so the
drawing does not use the projection under test) and taking the nearest surface. LiDAR points are sampled on
the surfaces a sensor mounted near the camera sees, plus points behind the camera and outside the field of view;
``expected`` is the class each should be painted with (255 for those that no pixel sees).

Used by the tests, ``make-bag --lidar`` and the painting benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ecmnet_core.data.classes import UNLABELED
from ecmnet_core.points.camera import CameraModel

SKY, ROAD, CAR, PEDESTRIAN = 0, 3, 8, 9  # CamVid class ids
#: optical frame (x right, y down, z forward) <- LiDAR frame (REP-103: x forward, y left, z up)
#: iterate cv2.undistortPoints to convergence (its default 5 iterations leave ~0.1 px at the corners)
UNDISTORT = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)
LIDAR_AXES = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


@dataclass(frozen=True)
class Box:
    """A surface facing the camera at depth ``z`` (m), spanning ``x0..x1`` and ``top..ground`` (optical frame)."""

    x0: float
    x1: float
    z: float
    top: float
    label: int


@dataclass
class Scene:
    """Camera, LiDAR -> camera transform, drawn labels, LiDAR points (N, 3) float32 + intensity, answer (N,)."""

    camera: CameraModel
    lidar_to_camera: np.ndarray
    labels: np.ndarray
    points: np.ndarray
    intensity: np.ndarray
    expected: np.ndarray


DEFAULT_BOXES = (Box(-4.0, -1.5, 12.0, -0.1, CAR), Box(2.0, 4.5, 18.0, -0.1, CAR),
                 Box(0.3, 1.0, 9.0, -0.3, PEDESTRIAN))


def scene_camera(width: int = 480, height: int = 360, distorted: bool = True) -> CameraModel:
    """A camera of about 60 degrees horizontal field of view, with mild barrel distortion when ``distorted``."""
    f = 0.85 * width
    d = np.array([-0.12, 0.03, 0.0005, -0.0004, 0.0]) if distorted else np.zeros(5)
    return CameraModel(width=width, height=height, k=np.array([[f, 0, width / 2 - 0.5], [0, f, height / 2 - 0.5],
                                                               [0, 0, 1.0]]),
                       d=d, distortion_model="plumb_bob", r=np.eye(3), p=np.zeros((3, 4)))


def lidar_to_camera(offset: tuple[float, float, float] = (0.0, -0.25, -0.4)) -> np.ndarray:
    """LiDAR mounted ``offset`` (optical-frame metres: 0.25 m above and 0.4 m behind the camera) -> camera."""
    m = np.eye(4)
    m[:3, :3] = LIDAR_AXES
    m[:3, 3] = offset  # p_cam = R p_lidar + t: the LiDAR origin lands at t
    return m


def _surfaces(x: np.ndarray, y: np.ndarray, camera_height: float, boxes: tuple[Box, ...]
              ) -> tuple[np.ndarray, np.ndarray]:
    """Class and depth of the nearest surface along normalised rays (x, y, 1); sky has depth inf."""
    depth = np.full(x.shape, np.inf)
    label = np.full(x.shape, SKY, np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        ground = np.where(y > 1e-6, camera_height / y, np.inf)
    hit = ground < depth
    depth[hit], label[hit] = ground[hit], ROAD
    for box in boxes:
        bx, by = x * box.z, y * box.z
        hit = (bx >= box.x0) & (bx <= box.x1) & (by >= box.top) & (by <= camera_height) & (box.z < depth)
        depth[hit], label[hit] = box.z, box.label
    return label, depth


def draw_labels(camera: CameraModel, camera_height: float = 1.5, boxes: tuple[Box, ...] = DEFAULT_BOXES
                ) -> np.ndarray:
    """(H, W) uint8 labels: the class of the nearest surface seen through each pixel centre."""
    h, w = camera.height, camera.width
    uu, vv = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pix = np.stack([uu.ravel(), vv.ravel()], axis=1).reshape(-1, 1, 2)
    rays = cv2.undistortPoints(pix, camera.k, camera.d, None, None, None, UNDISTORT).reshape(-1, 2)
    label, _ = _surfaces(rays[:, 0], rays[:, 1], camera_height, boxes)
    return label.reshape(h, w)


def driving_scene(width: int = 480, height: int = 360, points: int = 20_000, seed: int = 0, distorted: bool = True,
                  camera_height: float = 1.5, boxes: tuple[Box, ...] = DEFAULT_BOXES,
                  labels: np.ndarray | None = None) -> Scene:
    """The scene with ``points`` LiDAR points: most on visible surfaces, the rest behind the camera or outside
    the image. Points within 2 pixels of a label boundary are left out (their pixel is ambiguous). ``labels``:
    the scene's drawn labels from an earlier call with the same geometry (drawing is the slow part)."""
    rng = np.random.default_rng(seed)
    camera = scene_camera(width, height, distorted)
    if labels is None:
        labels = draw_labels(camera, camera_height, boxes)
    transform = lidar_to_camera()
    # visible points: rays through random pixels (undistorted directions) to the nearest surface
    n_front = int(points * 0.9)
    pix = rng.uniform([0, 0], [width - 1, height - 1], (n_front * 2, 2))
    rays = cv2.undistortPoints(pix.reshape(-1, 1, 2), camera.k, camera.d, None, None, None, UNDISTORT).reshape(-1, 2)
    label, depth = _surfaces(rays[:, 0], rays[:, 1], camera_height, boxes)
    sky = ~np.isfinite(depth)
    depth[sky] = rng.uniform(30, 80, sky.sum())  # far points seen against the sky
    cam = np.stack([rays[:, 0] * depth, rays[:, 1] * depth, depth], axis=1)
    # also points just outside the image (sides): they project off the label image
    n_side = max(1, n_front // 4)
    side_x = rng.choice([-1.0, 1.0], n_side) * rng.uniform(1.1, 2.0, n_side)  # beyond tan(half FOV) ~ 0.6
    side = np.stack([side_x * 10, rng.uniform(-1, camera_height, n_side), np.full(n_side, 10.0)], axis=1)
    # and behind the camera
    n_back = max(1, points - n_front - n_side if points > n_front + n_side else points // 10)
    back = rng.uniform([-20, -2, -30], [20, camera_height, -0.5], (n_back, 3))
    cam_all = np.concatenate([cam, side, back])
    exp_all = np.concatenate([label, np.full(n_side, UNLABELED, np.uint8), np.full(n_back, UNLABELED, np.uint8)])
    # keep the unambiguous ones: every pixel within 2 px of the point's pixel has its class (off-image: kept)
    img, _ = cv2.projectPoints(cam_all[: len(cam)], np.zeros(3), np.zeros(3), camera.k, camera.d)
    col = np.clip(np.floor(img[:, 0, 0] + 0.5).astype(int), 0, width - 1)
    row = np.clip(np.floor(img[:, 0, 1] + 0.5).astype(int), 0, height - 1)
    padded = np.pad(labels, 2, mode="edge")
    uniform = np.ones(len(cam), bool)
    for dr in range(5):
        for dc in range(5):
            uniform &= padded[row + dr, col + dc] == label
    keep = np.concatenate([uniform, np.ones(n_side + n_back, bool)])
    cam_all, exp_all = cam_all[keep], exp_all[keep]
    order = rng.permutation(len(cam_all))[:points]
    cam_all, exp_all = cam_all[order], exp_all[order]
    # camera frame -> LiDAR frame
    rot, t = transform[:3, :3], transform[:3, 3]
    lidar = (cam_all - t) @ rot  # inverse of p_cam = rot p_lidar + t
    intensity = rng.uniform(0, 100, len(lidar)).astype(np.float32)
    return Scene(camera=camera, lidar_to_camera=transform, labels=labels, points=lidar.astype(np.float32),
                 intensity=intensity, expected=exp_all)
