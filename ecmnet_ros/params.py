"""The segmenter node's parameters: one table with type, default, range and when a change takes effect.

Three kinds of parameter:

* ``live`` - validated when set and applied to the next frame (overlay alpha, publish toggles, rate limit ...).
* ``configure`` - read by the lifecycle *configure* transition (checkpoint, device, network size, topics ...).
  Setting one is refused while the node is configured; clean the node up, set it, configure again.
* ``startup`` - read once when the process starts (``autostart``); read-only.

``class_names`` is published as a read-only parameter once a model is loaded. The table is plain data so the launch
helper, the YAML documentation test and the node all read the same defaults without importing rclpy.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ecmnet_core.engines import ENGINES
from ecmnet_core.inference import InferenceConfig
from ecmnet_core.inference.pipeline import TTA_MODES
from ecmnet_core.model import VARIANTS
from ecmnet_core.ops.selective_scan import BACKENDS
from ecmnet_core.points.painting import rigid_transform

LIVE, CONFIGURE, STARTUP = "live", "configure", "startup"
#: rcl_interfaces/ParameterType values (kept here so this module does not need rclpy).
BOOL, INTEGER, DOUBLE, STRING, INTEGER_ARRAY, DOUBLE_ARRAY, STRING_ARRAY = 1, 2, 3, 4, 7, 8, 9
#: The largest network input side the node accepts (a typo like 100000 would try to allocate tens of GiB).
MAX_INPUT_SIDE = 8192
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter. ``default`` None declares it typed but unset (empty arrays cannot carry a type in ROS)."""

    name: str
    type: int
    default: Any
    kind: str
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def constraints(self) -> str:
        """Human-readable constraints for the descriptor (shown by ``ros2 param describe``)."""
        parts = []
        if self.choices is not None:
            parts.append("one of: " + ", ".join(repr(c) for c in self.choices))
        parts.append({LIVE: "applied on the next frame", CONFIGURE: "applied on lifecycle configure",
                      STARTUP: "read at start-up"}[self.kind])
        return "; ".join(parts)


PARAMS: tuple[ParamSpec, ...] = (
    # ---- model (configure)
    ParamSpec("checkpoint", STRING, "", CONFIGURE,
              "ecmnet checkpoint file (.pt, or .onnx from ecmnet-core export with backend onnxruntime); empty = "
              "the packaged CamVid model"),
    ParamSpec("model", STRING, "", CONFIGURE,
              "with an empty checkpoint: build this variant with RANDOM weights (tests and timing only)",
              choices=("", *VARIANTS)),
    ParamSpec("num_classes", INTEGER, 11, CONFIGURE, "classes of a random-weight model (ignored with a checkpoint)",
              range=(1, 255)),
    ParamSpec("device", STRING, "auto", CONFIGURE,
              "auto (CUDA when available, else CPU - reported in logs and diagnostics), cpu, cuda or cuda:N "
              "(an unavailable CUDA device is an error, never a silent CPU fallback)"),
    ParamSpec("fp16", BOOL, False, CONFIGURE, "half-precision inference (CUDA only)"),
    ParamSpec("channels_last", BOOL, True, CONFIGURE, "channels-last memory format (faster for this model on CPU)"),
    ParamSpec("input_size", INTEGER_ARRAY, None, CONFIGURE,
              "[H, W] network input size; unset = the checkpoint's size, [0, 0] = each image's own size. "
              "Labels are always published at the input image size"),
    ParamSpec("warmup", INTEGER, 1, CONFIGURE, "warm-up forward passes on configure", range=(0, 100)),
    ParamSpec("scan_backend", STRING, "", CONFIGURE, "selective-scan backend; empty = automatic",
              choices=("", "auto", *BACKENDS)),
    ParamSpec("backend", STRING, "torch", CONFIGURE,
              "inference backend: torch, or onnxruntime (runs an .onnx checkpoint, or exports the .pt checkpoint at "
              "input_size once and caches it)", choices=ENGINES),
    ParamSpec("dtype", STRING, "fp32", CONFIGURE, "fp32; fp16 (CUDA; also fp16: true); bf16 (CUDA autocast, CPU: "
              "bf16 convolutions); auto (CPU: bf16 convolutions where native and faster, else fp32)",
              choices=("fp32", "fp16", "bf16", "auto")),
    ParamSpec("optimize", BOOL, True, CONFIGURE, "torch backend: inference rewrites (batch norms folded into the "
              "convolutions, classifier before the last upsampling): same function, less work"),
    ParamSpec("compile", BOOL, False, CONFIGURE,
              "torch backend: torch.compile the model (minutes of compilation on configure; cached by inductor)"),
    ParamSpec("cuda_graphs", BOOL, False, CONFIGURE, "torch backend on CUDA: replay captured CUDA graphs"),
    ParamSpec("jit", BOOL, True, CONFIGURE, "torch backend on CPU with a fixed input_size: run a torch.export "
              "graph of the model (captured during warm-up); native-size input ([0, 0]) always runs eagerly"),
    ParamSpec("tta", STRING, "none", CONFIGURE, "test-time augmentation: none, or flip (also run the mirrored image "
              "and average the logits: about +1 point mIoU for twice the inference time)", choices=TTA_MODES),
    # ---- topics (configure)
    ParamSpec("image_topics", STRING_ARRAY, None, CONFIGURE,
              "several cameras served by one model: input topics, each camera's outputs go to "
              "<topic's namespace>/<node name>/...; unset = one input 'image' with outputs under ~/"),
    ParamSpec("compressed", BOOL, False, CONFIGURE,
              "subscribe to <topic>/compressed (sensor_msgs/CompressedImage); topics ending in /compressed "
              "are always compressed"),
    ParamSpec("use_camera_info", BOOL, True, CONFIGURE,
              "subscribe to the camera_info next to each image topic and republish it with the labels"),
    # ---- point painting (configure)
    ParamSpec("paint_points", BOOL, False, CONFIGURE,
              "subscribe to 'points' (sensor_msgs/PointCloud2) and publish ~/points_labeled: each point with the "
              "class of the pixel it projects to (needs use_camera_info)"),
    ParamSpec("lidar_to_camera", DOUBLE_ARRAY, None, CONFIGURE,
              "16 numbers, row-major 4x4 transform from the cloud's frame to the camera optical frame; unset = "
              "from TF (tf2_ros) at the cloud's stamp. One camera only"),
    # ---- point painting (live)
    ParamSpec("points_stamp_tolerance", DOUBLE, 0.05, LIVE,
              "seconds: a cloud is painted with the labels of the image stamped nearest to it within this; "
              "otherwise it is counted as unmatched and not published", range=(0.0, 10.0)),
    ParamSpec("points_wait", DOUBLE, 0.5, LIVE,
              "seconds a cloud waits for the labels of its image (still being segmented)", range=(0.0, 10.0)),
    ParamSpec("points_rectified", BOOL, False, LIVE,
              "the images are rectified: project with camera_info R and P (false: raw images, K and D)"),
    ParamSpec("paint_probability", BOOL, False, LIVE,
              "add a float32 'probability' field: the softmax probability of the painted class"),
    ParamSpec("points_filter_classes", STRING_ARRAY, None, LIVE,
              "class names dropped from ~/points_filtered (e.g. [Road, Sky]); unset = none"),
    ParamSpec("points_filter_unpainted", BOOL, False, LIVE,
              "also drop points no camera painted (outside the images) from ~/points_filtered"),
    # ---- behaviour (live)
    ParamSpec("min_confidence", DOUBLE, 0.0, LIVE, "pixels whose calibrated confidence is below this get label 255 "
              "(unknown) in ~/labels and are left out of coverage; 0 = off", range=(0.0, 1.0)),
    ParamSpec("overlay_alpha", DOUBLE, 0.5, LIVE, "weight of the class colours in ~/overlay", range=(0.0, 1.0)),
    ParamSpec("publish_color", BOOL, True, LIVE, "publish ~/color (computed only while subscribed)"),
    ParamSpec("publish_overlay", BOOL, True, LIVE, "publish ~/overlay (computed only while subscribed)"),
    ParamSpec("publish_coverage", BOOL, True, LIVE, "publish ~/coverage and ~/coverage_stamped"),
    ParamSpec("publish_camera_info", BOOL, True, LIVE, "republish camera_info as ~/camera_info with the labels"),
    ParamSpec("coverage_classes", STRING_ARRAY, None, LIVE,
              "class names listed in ~/coverage_stamped; unset or empty = all (~/coverage always has all)"),
    ParamSpec("max_rate_hz", DOUBLE, 0.0, LIVE, "process at most this many frames per second per camera; 0 = "
              "as fast as the model goes (frames in between are dropped and counted)", range=(0.0, 1000.0)),
    ParamSpec("max_image_pixels", INTEGER, 7680 * 4320, LIVE,
              "larger input images are rejected (warning + counter)", range=(1, 1 << 30)),
    # ---- start-up
    ParamSpec("autostart", BOOL, True, STARTUP,
              "configure and activate on start-up (false: wait for a lifecycle manager)"),
)
SPECS: dict[str, ParamSpec] = {p.name: p for p in PARAMS}
#: Published by the node after configure (read-only, from the checkpoint).
CLASS_NAMES = "class_names"


@dataclass(frozen=True)
class LiveSettings:
    """Snapshot of the live parameters; the worker reads one per frame, the parameter callback swaps it."""

    min_confidence: float = 0.0
    overlay_alpha: float = 0.5
    publish_color: bool = True
    publish_overlay: bool = True
    publish_coverage: bool = True
    publish_camera_info: bool = True
    coverage_classes: tuple[str, ...] = ()
    max_rate_hz: float = 0.0
    max_image_pixels: int = 7680 * 4320
    points_stamp_tolerance: float = 0.05
    points_wait: float = 0.5
    points_rectified: bool = False
    paint_probability: bool = False
    points_filter_classes: tuple[str, ...] = ()
    points_filter_unpainted: bool = False

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> LiveSettings:
        return cls(min_confidence=float(values["min_confidence"]),
                   overlay_alpha=float(values["overlay_alpha"]), publish_color=bool(values["publish_color"]),
                   publish_overlay=bool(values["publish_overlay"]), publish_coverage=bool(values["publish_coverage"]),
                   publish_camera_info=bool(values["publish_camera_info"]),
                   coverage_classes=tuple(c for c in values.get("coverage_classes") or () if c),
                   max_rate_hz=float(values["max_rate_hz"]), max_image_pixels=int(values["max_image_pixels"]),
                   points_stamp_tolerance=float(values["points_stamp_tolerance"]),
                   points_wait=float(values["points_wait"]), points_rectified=bool(values["points_rectified"]),
                   paint_probability=bool(values["paint_probability"]),
                   points_filter_classes=tuple(c for c in values.get("points_filter_classes") or () if c),
                   points_filter_unpainted=bool(values["points_filter_unpainted"]))


def validate(name: str, value: Any, class_names: list[str] | None = None) -> str | None:
    """Checks beyond type and range (rclpy does those from the descriptor). Returns a reason, or None if valid."""
    spec = SPECS.get(name)
    if spec is None:
        return None
    if spec.choices is not None and value not in spec.choices:
        return f"parameter {name!r}: {value!r} is not one of {', '.join(repr(c) for c in spec.choices)}"
    if name == "device" and not _DEVICE_RE.match(str(value).strip().lower()):
        return f"parameter 'device': {value!r} is not auto, cpu, cuda or cuda:N"
    if name == "checkpoint" and value and not os.path.isfile(os.path.expanduser(value)):
        return f"parameter 'checkpoint': file {value!r} does not exist"
    if name == "input_size" and value is not None:
        size = list(value)
        if len(size) != 2 or any(v < 0 for v in size) or (0 in size and size != [0, 0]) \
                or (size != [0, 0] and min(size) < 16) or max(size, default=0) > MAX_INPUT_SIDE:
            return (f"parameter 'input_size': {size} must be [H, W] with 16 <= H, W <= {MAX_INPUT_SIDE}, or [0, 0] "
                    "for native size")
    if name == "image_topics" and value is not None:
        topics = [str(t) for t in value]
        if any(not t.strip() for t in topics) or len(set(topics)) != len(topics):
            return f"parameter 'image_topics': {topics} has empty or repeated topics"
    if name in ("coverage_classes", "points_filter_classes") and value and class_names is not None:
        unknown = [c for c in value if c and c not in class_names]  # [""] is how a CLI clears the list
        if unknown:
            return f"parameter {name!r}: unknown class(es) {unknown}; the model has {class_names}"
    if name == "lidar_to_camera" and value is not None:
        if not all(math.isfinite(v) for v in value):
            return f"parameter 'lidar_to_camera': {list(value)} holds NaN or infinite values"
        try:
            rigid_transform(list(value))
        except ValueError as exc:
            return f"parameter 'lidar_to_camera': {exc}"
    return None


def inference_config(values: dict[str, Any]) -> InferenceConfig:
    """The :class:`InferenceConfig` the node's configure-time parameters ask for (``values``: name -> value)."""
    get = values.__getitem__
    size = get("input_size")
    return InferenceConfig(checkpoint=get("checkpoint") or None, model=get("model") or None,
                           num_classes=get("num_classes"), device=get("device"), fp16=get("fp16"),
                           channels_last=get("channels_last"), input_size=tuple(size) if size else None,
                           warmup=get("warmup"), scan_backend=get("scan_backend") or None, backend=get("backend"),
                           dtype=get("dtype"), optimize=get("optimize"), compile=get("compile"),
                           cuda_graphs=get("cuda_graphs"), jit=get("jit"), tta=get("tta"))


def node_parameters(config: InferenceConfig, model: str | None = None) -> dict[str, Any]:
    """The node parameters that make a node run ``config`` (the inverse of :func:`inference_config`): how
    ``replay --live`` starts a node with the model settings offline replay uses."""
    return {"checkpoint": config.checkpoint or "", "model": model or config.model or "", "device": config.device,
            "scan_backend": config.scan_backend or "", "channels_last": config.channels_last,
            "input_size": list(config.input_size) if config.input_size else None, "backend": config.backend,
            "dtype": config.precision, "optimize": config.optimize, "compile": config.compile, "jit": config.jit,
            "tta": config.tta}
