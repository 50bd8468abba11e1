"""Build the node's output messages from a segmentation result (label image, coverage, camera_info)."""

from __future__ import annotations

import copy
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Float32MultiArray, MultiArrayDimension, MultiArrayLayout

from ecmnet_core.image_messages import array_to_image

#: builds an Image from (array, encoding, header): :meth:`ecmnet_ros.bridge.ImageCodec.encode` (cv_bridge) in the
#: node, the core's :func:`~ecmnet_core.image_messages.array_to_image` by default
Encoder = Callable[[np.ndarray, str, Any], Any]


def labels_message(labels: np.ndarray, header, encode: Encoder = array_to_image):
    """(H, W) uint8 class ids (or confidence grey levels) -> mono8 ``Image`` with the input's header."""
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"labels must be an (H, W) uint8 array, got {labels.shape} {labels.dtype}")
    return encode(labels, "mono8", header)


def bgr_message(image: np.ndarray, header, encode: Encoder = array_to_image):
    """(H, W, 3) BGR uint8 (colour mask, overlay) -> bgr8 ``Image`` with the input's header."""
    return encode(image, "bgr8", header)


def coverage_array(coverage: np.ndarray) -> Float32MultiArray:
    """Per-class pixel fractions in class-id order; ``layout.dim[0]`` is labelled ``class``."""
    n = int(coverage.shape[0])
    layout = MultiArrayLayout(dim=[MultiArrayDimension(label="class", size=n, stride=n)], data_offset=0)
    return Float32MultiArray(layout=layout, data=array("f", coverage.astype(np.float32).tobytes()))


def coverage_stamped(header, coverage: np.ndarray, class_names: list[str], name: str,
                     only: tuple[str, ...] = (), unknown_share: float | None = None) -> DiagnosticArray:
    """The stamped, self-describing companion: header = input header, one ``KeyValue(class, fraction)`` per class.

    ``only`` restricts the listed classes (the ``coverage_classes`` parameter); empty lists all of them.
    ``unknown_share`` (with ``min_confidence``) adds ``KeyValue("unknown", fraction of all pixels)``; the class
    fractions are then of the pixels that kept a class.
    """
    wanted = set(only)
    values = [KeyValue(key=cls, value=f"{float(frac):.6f}") for cls, frac in zip(class_names, coverage)
              if not wanted or cls in wanted]
    if unknown_share is not None:
        values.append(KeyValue(key="unknown", value=f"{float(unknown_share):.6f}"))
    status = DiagnosticStatus(level=DiagnosticStatus.OK, name=name, message="class coverage (fraction of labelled "
                              "pixels)", hardware_id=header.frame_id, values=values)
    return DiagnosticArray(header=header, status=[status])


def scale_camera_info(info: CameraInfo, header, width: int, height: int) -> CameraInfo:
    """Copy ``info`` with the label image's header; K, P, roi and size scaled when the image size differs."""
    out = copy.deepcopy(info)
    out.header = header
    if (info.width, info.height) == (width, height) or info.width == 0 or info.height == 0:
        return out
    sx, sy = width / info.width, height / info.height
    k = np.asarray(info.k, np.float64).reshape(3, 3).copy()
    k[0] *= sx
    k[1] *= sy
    p = np.asarray(info.p, np.float64).reshape(3, 4).copy()
    p[0] *= sx
    p[1] *= sy
    out.k, out.p = k.ravel().tolist(), p.ravel().tolist()
    out.width, out.height = int(width), int(height)
    roi = out.roi
    roi.x_offset, roi.width = int(round(roi.x_offset * sx)), int(round(roi.width * sx))
    roi.y_offset, roi.height = int(round(roi.y_offset * sy)), int(round(roi.height * sy))
    return out
