"""3-D points and the segmenter: camera model, PointCloud2 codec, point painting (no ROS inside)."""

from ecmnet_core.points.camera import CameraModel, CameraModelError
from ecmnet_core.points.cloud import Cloud, CloudError, read_cloud
from ecmnet_core.points.painting import CloudMatcher, LabelFrame, PaintResult, paint_points

__all__ = ["CameraModel", "CameraModelError", "Cloud", "CloudError", "CloudMatcher", "LabelFrame", "PaintResult",
           "paint_points", "read_cloud"]
