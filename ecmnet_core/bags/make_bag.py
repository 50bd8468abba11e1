"""``ecmnet-core make-bag``: write a rosbag2 (sqlite3 or mcap) from a dataset split or an image folder.

Each frame becomes a ``sensor_msgs/Image`` (bgr8) or ``sensor_msgs/CompressedImage`` (JPEG) on the image topic,
with header stamps spaced 1/rate apart; when the frame has a ground-truth label it is written as a mono8 image
with the same header on the label topic (void / ignore pixels = 255). Dataset facts (class names, palette, frame
names, topics) go into the bag's ``custom_data`` so ``replay`` can report per-class figures with names.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecmnet_core.bags.reader import (
    CAMERA_INFO,
    COMPRESSED_IMAGE,
    CUSTOM_PREFIX,
    IMAGE,
    POINT_CLOUD2,
    BagError,
)
from ecmnet_core.data.classes import UNLABELED
from ecmnet_core.image_messages import array_to_compressed, array_to_image

log = logging.getLogger(__name__)

STORAGES = ("sqlite3", "mcap")
#: distro -> rosbags typestore name and rosbag2 metadata version
DISTROS = {"kilted": ("ROS2_KILTED", 9), "jazzy": ("ROS2_JAZZY", 8), "humble": ("ROS2_HUMBLE", 8)}


@dataclass
class BagFrame:
    """One camera frame: BGR uint8 (H, W, 3) image, optional (H, W) uint8 label (255 = unlabeled), its name."""

    image: np.ndarray
    label: np.ndarray | None
    name: str


@dataclass
class BagWriteConfig:
    """Where and how to write. ``compressed`` writes JPEG CompressedImage on ``<topic>/compressed``."""

    out: Path
    rate: float = 15.0
    storage: str = "sqlite3"
    compressed: bool = False
    jpeg_quality: int = 90
    topic: str = "/camera/image_raw"
    label_topic: str = "/camera/labels"
    frame_id: str = "camera"
    distro: str = "kilted"
    start_time: float | None = None  # seconds since the epoch of the first stamp; None = now
    overwrite: bool = False
    custom: dict[str, object] = field(default_factory=dict)
    lidar_points: int = 0  # > 0: a synthetic LiDAR cloud with each frame (and camera_info)
    points_topic: str = "/lidar/points"
    lidar_frame_id: str = "lidar"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.rate > 0:
            raise ValueError(f"--rate must be > 0 frames per second, got {self.rate}")
        if self.storage not in STORAGES:
            raise ValueError(f"--storage {self.storage!r} is not supported (choose {' or '.join(STORAGES)})")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.distro not in DISTROS:
            raise ValueError(f"--distro {self.distro!r} is not supported (choose {', '.join(DISTROS)})")
        if self.lidar_points < 0:
            raise ValueError(f"--lidar must be >= 0 points per cloud, got {self.lidar_points}")
        for name, topic in (("--topic", self.topic), ("--label-topic", self.label_topic),
                            ("--points-topic", self.points_topic)):
            if topic and not topic.startswith("/"):
                raise ValueError(f"{name} {topic!r} must be an absolute topic name (start with '/')")
        if self.compressed and not self.topic.endswith("/compressed"):
            self.topic = f"{self.topic}/compressed"  # image_transport naming: <base>/compressed
        if self.label_topic and self.label_topic == self.topic:
            raise ValueError(f"--label-topic must differ from the image topic {self.topic!r}")


@dataclass
class BagSummary:
    """What was written."""

    path: Path
    storage: str
    frames: int
    labels: int
    image_topic: str
    label_topic: str | None
    start_ns: int
    duration_s: float


def qos_profile() -> Any:
    """Offered QoS recorded for the topics (a ``rosbags`` Qos): ROS default, reliable, volatile, keep-last 10."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, 10, QosReliability.RELIABLE, QosDurability.VOLATILE, zero, zero,
               QosLiveliness.AUTOMATIC, zero, False)


def write_image_bag(frames: Iterable[BagFrame], config: BagWriteConfig) -> BagSummary:
    """Write ``frames`` to a new bag directory ``config.out`` (written to a temporary sibling, then renamed)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    out = config.out
    if out.exists():
        if not config.overwrite:
            raise BagError(f"bag output {out} already exists (remove it or pass --overwrite)")
        if not (out / "metadata.yaml").is_file():
            raise BagError(f"refusing to overwrite {out}: it is not a rosbag2 directory (no metadata.yaml)")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # write into a hidden sibling folder under the final name (rosbag2 names the storage file after the bag
    # directory), then move it into place: an interrupted run never leaves a half-written bag at ``out``
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    tmp = staging / out.name

    store_name, version = DISTROS[config.distro]
    ts = get_typestore(getattr(Stores, store_name))
    image_cls, compressed_cls = ts.types[IMAGE], ts.types[COMPRESSED_IMAGE]
    header_cls, time_cls = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    plugin = StoragePlugin.MCAP if config.storage == "mcap" else StoragePlugin.SQLITE3
    start_ns = int(round((time.time() if config.start_time is None else config.start_time) * 1e9))
    period_ns = 1e9 / config.rate

    def header(t_ns: int):
        return header_cls(stamp=time_cls(sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000),
                          frame_id=config.frame_id)

    n_frames = n_labels = 0
    names: list[str] = []
    size: tuple[int, int] | None = None
    writer = Writer(tmp, version=version, storage_plugin=plugin)
    try:
        with writer:
            img_type = COMPRESSED_IMAGE if config.compressed else IMAGE
            qos = [qos_profile()]
            img_conn = writer.add_connection(config.topic, img_type, typestore=ts, offered_qos_profiles=qos)
            label_conn = None
            lidar = _LidarWriter(writer, ts, config, qos) if config.lidar_points else None
            for i, frame in enumerate(frames):
                image = _check_image(frame)
                t_ns = start_ns + int(round(i * period_ns))
                if config.compressed:
                    msg = array_to_compressed(image, "jpeg", header(t_ns), config.jpeg_quality, compressed_cls)
                else:
                    msg = array_to_image(image, "bgr8", header(t_ns), image_cls)
                writer.write(img_conn, t_ns, ts.serialize_cdr(msg, img_type))
                if frame.label is not None and config.label_topic:
                    label = _check_label(frame, image.shape[:2])
                    if label_conn is None:
                        label_conn = writer.add_connection(config.label_topic, IMAGE, typestore=ts,
                                                           offered_qos_profiles=qos)
                    msg = array_to_image(label, "mono8", header(t_ns), image_cls)
                    writer.write(label_conn, t_ns, ts.serialize_cdr(msg, IMAGE))
                    n_labels += 1
                if lidar is not None:
                    lidar.write(i, t_ns, image.shape[:2], header(t_ns))
                n_frames += 1
                names.append(frame.name)
                size = size or image.shape[:2]
            if n_frames == 0:
                raise BagError("no frames to write (the source is empty)")
            custom = {**config.custom, "frames": names, "image_topic": config.topic, "rate": config.rate,
                      "label_topic": config.label_topic if label_conn is not None else "",
                      "ignore_index": UNLABELED, "image_size": list(size or ()),
                      **(lidar.custom() if lidar is not None else {})}
            for key, value in custom.items():
                writer.set_custom_data(CUSTOM_PREFIX + key, json.dumps(value))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tmp.rename(out)
    staging.rmdir()
    return BagSummary(out, config.storage, n_frames, n_labels, config.topic,
                      config.label_topic if n_labels else None, start_ns, (n_frames - 1) / config.rate)


class _LidarWriter:
    """``make-bag --lidar N``: with every frame a CameraInfo and a PointCloud2 of the synthetic driving scene
    (:mod:`ecmnet_core.points.synthetic`: road plane, cars, a pedestrian, seen by a LiDAR 0.25 m above and
    0.4 m behind the camera), stamped like the image. The clouds do not match the images' content (there is
    no depth in the data sets): they exercise painting end to end and show which classes points land on."""

    def __init__(self, writer: Any, ts: Any, config: BagWriteConfig, qos: list[Any]) -> None:
        self.writer, self.ts, self.config = writer, ts, config
        base = config.topic.removesuffix("/compressed").rsplit("/", 1)[0]
        self.info_topic = f"{base}/camera_info"
        self.info_conn = writer.add_connection(self.info_topic, CAMERA_INFO, typestore=ts, offered_qos_profiles=qos)
        self.points_conn = writer.add_connection(config.points_topic, POINT_CLOUD2, typestore=ts,
                                                 offered_qos_profiles=qos)
        self._labels: dict[tuple[int, int], np.ndarray] = {}
        self.transform: np.ndarray | None = None

    def write(self, index: int, t_ns: int, size: tuple[int, int], header: Any) -> None:
        from ecmnet_core.points.cloud import cloud_message, xyz_records
        from ecmnet_core.points.synthetic import driving_scene

        h, w = size
        scene = driving_scene(width=w, height=h, points=self.config.lidar_points, seed=index, distorted=False,
                              labels=self._labels.get(size))
        self._labels[size] = scene.labels
        self.transform = scene.lidar_to_camera
        t = self.ts.types
        cam = scene.camera
        roi = t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        info = t[CAMERA_INFO](header=header, height=h, width=w, distortion_model=cam.distortion_model,
                              d=cam.d.copy(), k=cam.k.ravel().copy(), r=cam.r.ravel().copy(), p=cam.p.ravel().copy(),
                              binning_x=0, binning_y=0, roi=roi)
        self.writer.write(self.info_conn, t_ns, self.ts.serialize_cdr(info, CAMERA_INFO))
        records, fields = xyz_records(scene.points, {"intensity": scene.intensity})
        lidar_header = type(header)(stamp=header.stamp, frame_id=self.config.lidar_frame_id)
        cloud = cloud_message(records, fields, lidar_header, msg_type=t[POINT_CLOUD2],
                              field_type=t["sensor_msgs/msg/PointField"])
        self.writer.write(self.points_conn, t_ns, self.ts.serialize_cdr(cloud, POINT_CLOUD2))

    def custom(self) -> dict[str, object]:
        transform = self.transform.ravel().tolist() if self.transform is not None else None
        return {"points_topic": self.config.points_topic, "camera_info_topic": self.info_topic,
                "lidar_to_camera": transform}


def _check_image(frame: BagFrame) -> np.ndarray:
    image = frame.image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BagError(f"frame {frame.name}: expected an HxWx3 uint8 BGR image, got {image.dtype} {image.shape}")
    return image


def _check_label(frame: BagFrame, size: tuple[int, int]) -> np.ndarray:
    label = frame.label
    assert label is not None
    if label.dtype != np.uint8 or label.ndim != 2:
        raise BagError(f"frame {frame.name}: expected an HxW uint8 label, got {label.dtype} {label.shape}")
    if label.shape != size:
        raise BagError(f"frame {frame.name}: label is {label.shape[1]}x{label.shape[0]} but the image is "
                       f"{size[1]}x{size[0]} (WxH)")
    return label


# ------------------------------------------------------------------------------------------------ sources
def dataset_frames(kind: str, root: str | Path, split: str, limit: int | None = None
                   ) -> tuple[dict[str, object], int, Iterator[BagFrame]]:
    """Frames of a dataset split (labels in train ids with the ignore index mapped to 255).

    Returns ``(custom_data, number_of_frames, frames)``; frames are loaded lazily, one at a time.
    """
    from ecmnet_core.data import build_dataset, load_raw

    info, samples = build_dataset(kind, root, split)  # a list of Sample, or a ShardReader for packed shards
    count = min(len(samples), limit) if limit else len(samples)
    custom = {"dataset": info.name, "split": split, "source": str(Path(root).resolve()),
              "class_names": list(info.class_names), "palette": [list(c) for c in info.palette]}
    num_classes = info.num_classes

    def frames() -> Iterator[BagFrame]:
        for i in range(count):
            image, label = load_raw(samples, i)
            if label is not None:
                label = np.where(label < num_classes, label, UNLABELED).astype(np.uint8)
            stem = samples.stem(i) if hasattr(samples, "stem") else samples[i].stem
            yield BagFrame(image, label, stem)

    return custom, count, frames()


def folder_frames(images: str | Path, labels: str | Path | None = None, limit: int | None = None
                  ) -> tuple[dict[str, object], int, Iterator[BagFrame]]:
    """Frames from a plain image folder (sorted by name); labels (same stem, class-id PNG) are optional."""
    from ecmnet_core.data.builders import IMAGE_EXTENSIONS, image_files
    from ecmnet_core.data.io import read_image, read_label

    images = Path(images)
    if not images.is_dir():
        raise BagError(f"--images {images} is not a folder")
    paths = image_files(images)
    if not paths:
        raise BagError(f"--images {images} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    paths = paths[:limit] if limit else paths
    label_dir = Path(labels) if labels else None
    if label_dir is not None and not label_dir.is_dir():
        raise BagError(f"--labels {label_dir} is not a folder")

    def frames() -> Iterator[BagFrame]:
        for p in paths:
            label = None
            if label_dir is not None:
                found = [q for q in (label_dir / f"{p.stem}{e}" for e in (".png", *IMAGE_EXTENSIONS)) if q.is_file()]
                label = read_label(found[0]) if found else None
            yield BagFrame(read_image(p), label, p.stem)

    return {"source": str(images.resolve())}, len(paths), frames()


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("source (one of)")
    src.add_argument("--data", metavar="ROOT", help="dataset root (CamVid / Cityscapes / folder with classes.yaml)")
    src.add_argument("--images", metavar="DIR", help="plain folder of images, played in name order")
    parser.add_argument("--split", default="val", help="dataset split with --data (default: val)")
    parser.add_argument("--kind", default="auto", help="dataset layout with --data (default: auto-detect)")
    parser.add_argument("--labels", metavar="DIR", help="class-id label PNGs (same stem) for --images")
    parser.add_argument("--limit", type=int, default=None, help="write at most this many frames")
    parser.add_argument("--out", required=True, metavar="BAG_DIR", help="bag directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bag directory")
    parser.add_argument("--rate", type=float, default=15.0, help="frames per second of the stamps (default: 15)")
    parser.add_argument("--storage", choices=STORAGES, default="sqlite3", help="rosbag2 storage plugin")
    parser.add_argument("--compressed", action="store_true",
                        help="write sensor_msgs/CompressedImage (JPEG) on <topic>/compressed")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default: 90)")
    parser.add_argument("--topic", default="/camera/image_raw", help="image topic (default: /camera/image_raw)")
    parser.add_argument("--label-topic", default="/camera/labels",
                        help="ground-truth mono8 label topic, '' for none (default: /camera/labels)")
    parser.add_argument("--frame-id", default="camera", help="header frame_id (default: camera)")
    parser.add_argument("--distro", choices=list(DISTROS), default="kilted", help="message definitions / metadata")
    parser.add_argument("--start-time", type=float, default=None,
                        help="stamp of the first frame in seconds since the epoch (default: now)")
    parser.add_argument("--lidar", type=int, default=0, metavar="N",
                        help="add a synthetic LiDAR PointCloud2 of N points per frame, and camera_info next to "
                             "the image topic (for point painting in replay and the node)")
    parser.add_argument("--points-topic", default="/lidar/points", help="cloud topic with --lidar")


def run(args: argparse.Namespace) -> int:
    if bool(args.data) == bool(args.images):
        raise SystemExit("make-bag: give exactly one source, --data ROOT or --images DIR")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"make-bag: --limit must be >= 1, got {args.limit}")
    try:
        if args.data:
            custom, total, frames = dataset_frames(args.kind, args.data, args.split, args.limit)
        else:
            custom, total, frames = folder_frames(args.images, args.labels, args.limit)
        config = BagWriteConfig(out=args.out, rate=args.rate, storage=args.storage, compressed=args.compressed,
                                jpeg_quality=args.jpeg_quality, topic=args.topic, label_topic=args.label_topic,
                                frame_id=args.frame_id, distro=args.distro, start_time=args.start_time,
                                overwrite=args.overwrite, custom=custom, lidar_points=args.lidar,
                                points_topic=args.points_topic)
        summary = write_image_bag(frames, config)
    except (BagError, ValueError) as exc:  # DataError is a ValueError
        raise SystemExit(f"make-bag: {exc}") from None
    print(f"wrote {summary.path} ({summary.storage}): {summary.frames} frames on {summary.image_topic}"
          + (f", {summary.labels} labels on {summary.label_topic}" if summary.label_topic else ", no labels")
          + f", {summary.duration_s:.2f} s at {config.rate:g} Hz"
          + (f"; {config.lidar_points} LiDAR points per frame on {config.points_topic}" if config.lidar_points else ""))
    return 0
