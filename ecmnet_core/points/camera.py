"""A pinhole camera model from ``sensor_msgs/CameraInfo``: project 3-D points in the camera frame to pixels.

Conventions (those of ROS ``image_geometry`` and OpenCV):

* Points are in the camera's optical frame: x right, y down, z forward (REP-103 ``*_optical_frame``).
* Raw images (``rectified=False``): ``K`` and the distortion ``D`` of ``distortion_model`` -- ``plumb_bob``
  (k1 k2 p1 p2 [k3]), ``rational_polynomial`` (k1 k2 p1 p2 k3 k4 k5 k6) or ``equidistant`` (fisheye k1..k4),
  as ``cv2.projectPoints`` / ``cv2.fisheye.projectPoints`` compute them. An empty or all-zero ``D`` is no
  distortion.
* Rectified images (``rectified=True``): the point is rotated by ``R`` into the rectified frame and projected
  with ``P`` (3x4, so a stereo right camera's baseline term applies), as ``image_geometry`` does.
* Pixel coordinates have integer values at pixel centres: pixel (row, col) covers ``[col - 0.5, col + 0.5)``.

Polynomial distortion models fold back on themselves far outside the field of view (a point at 80 degrees can
land in the middle of the image). Points beyond the radius where the model stops growing are therefore marked
invalid, like points at or behind the image plane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: distortion_model -> number of coefficients it uses (shorter D vectors are padded with zeros)
DISTORTION_MODELS = {"plumb_bob": 5, "rational_polynomial": 8, "equidistant": 4}


class CameraModelError(ValueError):
    """A CameraInfo that cannot be used for projection (uncalibrated, unknown distortion model ...)."""


@dataclass(frozen=True)
class CameraModel:
    """Intrinsics of one camera at ``width`` x ``height`` pixels.

    Shapes: ``k`` (3, 3), ``d`` (n,), ``r`` (3, 3), ``p`` (3, 4), float64.
    """

    width: int
    height: int
    k: np.ndarray
    d: np.ndarray
    distortion_model: str
    r: np.ndarray
    p: np.ndarray

    def __post_init__(self) -> None:
        k = np.asarray(self.k, np.float64).reshape(3, 3)
        if not (k[0, 0] > 0 and k[1, 1] > 0) or not np.isfinite(k).all():
            raise CameraModelError("camera K has no positive focal lengths (uncalibrated camera?): "
                                   f"{k.ravel().tolist()}")
        d = np.asarray(self.d, np.float64).ravel()
        model = (self.distortion_model or "").strip()
        if not model and not d.any():
            model = "plumb_bob"  # an unset model with no coefficients: no distortion
        if model not in DISTORTION_MODELS:
            raise CameraModelError(f"camera distortion_model {model!r} is not supported (use one of "
                                   f"{', '.join(DISTORTION_MODELS)})")
        n = DISTORTION_MODELS[model]
        if d.size > n and d[n:].any():
            raise CameraModelError(f"camera D has {d.size} coefficients, {model} uses {n}: {d.tolist()}")
        d = np.pad(d[:n], (0, max(0, n - d.size)))
        r = np.asarray(self.r, np.float64).reshape(3, 3)
        if not r.any():
            r = np.eye(3)  # an unset R (all zeros) means no rectification rotation
        p = np.asarray(self.p, np.float64).reshape(3, 4)
        if not p.any():
            p = np.hstack([k, np.zeros((3, 1))])  # monocular camera without P: the rectified image is K's
        if self.width < 0 or self.height < 0:
            raise CameraModelError(f"camera size {self.width}x{self.height} is negative")
        for name, value in (("k", k), ("d", d), ("distortion_model", model), ("r", r), ("p", p)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_max_radius", _monotonic_radius(model, d))

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_camera_info(cls, info: Any) -> CameraModel:
        """From a ``sensor_msgs/CameraInfo`` (rclpy or rosbags message: fields k, d, r, p, distortion_model).

        A set binning or ROI (a camera publishing a sub-window) is applied to K and P.
        """
        model = cls(width=int(info.width), height=int(info.height), k=np.asarray(info.k, np.float64),
                    d=np.asarray(info.d, np.float64), distortion_model=str(info.distortion_model),
                    r=np.asarray(info.r, np.float64), p=np.asarray(info.p, np.float64))
        bx, by = int(getattr(info, "binning_x", 0) or 1), int(getattr(info, "binning_y", 0) or 1)
        roi = getattr(info, "roi", None)
        ox, oy = (int(roi.x_offset), int(roi.y_offset)) if roi is not None else (0, 0)
        rw, rh = (int(roi.width), int(roi.height)) if roi is not None else (0, 0)
        if (bx, by) == (1, 1) and (ox, oy, rw, rh) == (0, 0, 0, 0):
            return model
        k, p = model.k.copy(), model.p.copy()
        for m in (k, p):
            m[0, 2] -= ox
            m[1, 2] -= oy
            m[0] /= bx
            m[1] /= by
        width = (rw or model.width) // bx
        height = (rh or model.height) // by
        return cls(width=width, height=height, k=k, d=model.d, distortion_model=model.distortion_model,
                   r=model.r, p=p)

    @classmethod
    def pinhole(cls, fx: float, fy: float, cx: float, cy: float, width: int, height: int) -> CameraModel:
        """A distortion-free camera."""
        return cls(width=width, height=height, k=np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]),
                   d=np.zeros(5), distortion_model="plumb_bob", r=np.eye(3), p=np.zeros((3, 4)))

    def scaled(self, width: int, height: int) -> CameraModel:
        """The same camera for an image resized to ``width`` x ``height`` (K and P rows scaled).

        A model of unknown size (0 x 0, as some drivers publish) is returned unchanged.
        """
        if (width, height) == (self.width, self.height) or self.width == 0 or self.height == 0:
            return self
        sx, sy = width / self.width, height / self.height
        k, p = self.k.copy(), self.p.copy()
        for m in (k, p):  # as image_proc's resize scales camera_info (and the node's ~/camera_info)
            m[0] *= sx
            m[1] *= sy
        return CameraModel(width=width, height=height, k=k, d=self.d, distortion_model=self.distortion_model,
                           r=self.r, p=p)

    # ------------------------------------------------------------------------------------------- projection
    def project(self, points: np.ndarray, rectified: bool = False, min_depth: float = 0.0
                ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) points in the camera optical frame -> (N, 2) pixel coordinates (u, v) and an (N,) valid mask.

        Invalid: depth ``z <= min_depth`` (behind the camera), non-finite coordinates, or beyond the radius
        where the distortion model folds back. Pixel coordinates of invalid points are undefined. float32
        points are projected in float32.
        """
        pts = np.asarray(points)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must be an (N, 3) array, got shape {pts.shape}")
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        if rectified and not np.array_equal(self.r, np.eye(3)):
            (a, b, c), (d, e, f), (g, h, i) = self.r.tolist()
            x, y, z = a * x + b * y + c * z, d * x + e * y + f * z, g * x + h * y + i * z
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            valid = z > min_depth  # False for NaN
            if rectified:
                p = self.p.tolist()  # Python floats keep float32 arrays float32
                w = p[2][0] * x + p[2][1] * y + p[2][2] * z + p[2][3]
                u = (p[0][0] * x + p[0][1] * y + p[0][2] * z + p[0][3]) / w
                v = (p[1][0] * x + p[1][1] * y + p[1][2] * z + p[1][3]) / w
                valid &= (w > 0) & np.isfinite(u) & np.isfinite(v)
                return np.stack([u, v], axis=1), valid
            inv = 1 / z
            xd, yd, ok = self._distort(x * inv, y * inv)
            valid &= ok
            (fx, s, cx), (_, fy, cy) = self.k[:2].tolist()
            return np.stack([fx * xd + s * yd + cx, fy * yd + cy], axis=1), valid

    def _distort(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised undistorted -> distorted coordinates, and where the model is still one-to-one."""
        d = self.d.tolist()
        r2 = x * x + y * y
        limit = self._max_radius  # type: ignore[attr-defined]
        ok = (r2 <= limit * limit) if np.isfinite(limit) else np.isfinite(r2)  # False for NaN and inf
        if not any(d):
            return x, y, ok
        if self.distortion_model == "equidistant":
            r = np.sqrt(r2)
            theta = np.arctan(r)
            t2 = theta * theta
            theta_d = theta * (1 + t2 * (d[0] + t2 * (d[1] + t2 * (d[2] + t2 * d[3]))))
            scale = np.where(r > 1e-12, theta_d / r, 1.0).astype(x.dtype, copy=False)
            return x * scale, y * scale, ok
        k1, k2, p1, p2, k3 = d[:5]
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        if self.distortion_model == "rational_polynomial":
            k4, k5, k6 = d[5:8]
            radial = radial / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
        xy = x * y
        xd = x * radial + 2 * p1 * xy + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * xy
        return xd, yd, ok


def _monotonic_radius(model: str, d: np.ndarray, limit: float = 20.0, steps: int = 20001) -> float:
    """Largest normalised radius up to which the radial distortion keeps increasing (``inf`` if it does
    up to ``limit``, about 87 degrees off axis)."""
    if not d.any():
        return np.inf
    r = np.linspace(0.0, limit, steps)
    r2 = r * r
    if model == "equidistant":
        theta = np.arctan(r)
        t2 = theta * theta
        rd = theta * (1 + t2 * (d[0] + t2 * (d[1] + t2 * (d[2] + t2 * d[3]))))
    else:
        radial = 1 + r2 * (d[0] + r2 * (d[1] + r2 * d[4]))
        if model == "rational_polynomial":
            with np.errstate(divide="ignore", invalid="ignore"):
                radial = radial / (1 + r2 * (d[5] + r2 * (d[6] + r2 * d[7])))
        rd = r * radial
    bad = np.flatnonzero(~(np.diff(rd) > 0) | ~np.isfinite(rd[1:]))
    return float(r[bad[0]]) if bad.size else np.inf
