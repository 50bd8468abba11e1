"""Read rosbag2 recordings (sqlite3 or mcap, written by ROS or by ``make-bag``) without a ROS install.

:class:`BagReader` opens a bag directory (or a bare ``.db3`` / ``.mcap`` file), checks the topics a caller asks for
and yields messages in recorded receive-time order. Image messages are decoded with the same conversions the ROS
node uses (:mod:`ecmnet_core.image_messages`), so offline replay sees exactly the pixels the node would see.
Everything that is wrong with a bag as a whole is a :class:`BagError`; a single message that cannot be
deserialized or decoded is skipped and counted in :attr:`BagReader.skipped`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecmnet_core import image_messages

log = logging.getLogger(__name__)

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)
POINT_CLOUD2 = "sensor_msgs/msg/PointCloud2"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
#: Label pixels with this value are unlabeled (the ROS label-image convention, see ros_notes §3.7).
#: Keys under which ``make-bag`` stores dataset facts in the bag's ``custom_data``.
CUSTOM_PREFIX = "ecmnet."


class BagError(RuntimeError):
    """A bag that cannot be used: missing, corrupt, empty, or without the requested topic / message type."""


@dataclass(frozen=True)
class TopicInfo:
    """One topic of a bag: name, message type, number of messages."""

    name: str
    msgtype: str
    count: int

    def __str__(self) -> str:
        return f"{self.name} [{self.msgtype}, {self.count} msgs]"


@dataclass
class BagMessage:
    """One message in receive-time order: raw CDR bytes plus the deserialized message and its header stamp.

    ``stamp_ns`` is the header stamp (None for header-less types); ``t_ns`` the bag's receive time.
    """

    topic: str
    msgtype: str
    t_ns: int
    raw: bytes
    msg: Any
    stamp_ns: int | None
    frame_id: str = ""


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` (rosbags or rclpy object) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def decode_image_message(msg: Any, msgtype: str) -> np.ndarray:
    """Image / CompressedImage message -> BGR uint8 (H, W, 3), or (H, W) uint8 for single-channel images.

    The ROS node's converter: every encoding the node accepts is accepted here, with identical pixels.
    """
    if msgtype == COMPRESSED_IMAGE:
        return image_messages.compressed_to_bgr8(msg)
    return image_messages.image_to_bgr8(msg)


def decode_label_message(msg: Any, msgtype: str) -> np.ndarray:
    """A ground-truth or predicted label image (mono8 / 8UC1, or lossless PNG) -> (H, W) uint8 class ids."""
    if msgtype == COMPRESSED_IMAGE:
        fmt = str(msg.format).lower()
        if "jpeg" in fmt or "jpg" in fmt:
            raise ValueError(f"label image is {msg.format!r}: JPEG is lossy and cannot carry class ids")
        labels = image_messages.compressed_to_bgr8(msg)
    else:
        if str(msg.encoding) not in ("mono8", "8UC1"):
            raise ValueError(f"label image has encoding {msg.encoding!r}; expected mono8 (8-bit class ids)")
        labels = image_messages.image_to_array(msg)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"label image decodes to {labels.dtype} {labels.shape}; expected 8-bit single-channel")
    return labels


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.LATEST)


class BagReader:
    """An open rosbag2 recording. Use as a context manager.

    Args:
        path: bag directory (with metadata.yaml) or a bare ``.db3`` / ``.mcap`` storage file. A directory whose
            metadata.yaml is missing (recording interrupted) is read through its single storage file.
    """

    def __init__(self, path: str | Path) -> None:
        from rosbags.rosbag2 import Reader

        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"bag {self.path} does not exist")
        target = self.path
        if self.path.is_dir() and not (self.path / "metadata.yaml").exists():
            files = sorted(p for p in self.path.iterdir() if p.suffix in (".db3", ".mcap"))
            if len(files) != 1:
                found = ", ".join(p.name for p in self.path.iterdir()) or "nothing"
                raise BagError(f"bag {self.path} has no metadata.yaml and not exactly one .db3/.mcap file "
                               f"(found: {found}); is it a rosbag2 directory?")
            log.warning("bag %s has no metadata.yaml (recording interrupted?); reading %s directly",
                        self.path, files[0].name)
            target = files[0]
        #: where the storage file ends early and what was read before it (None: read whole)
        self.truncation: str | None = None
        try:
            self._reader = Reader(target)
            self._reader.open()
        except Exception as exc:  # rosbags raises ReaderError, sqlite3/mcap/yaml errors, FileNotFoundError
            self._reader = self._salvage(target, exc)
        self.storage = "mcap" if _storage_suffix(target) == ".mcap" else "sqlite3"
        self.typestore = _typestore()
        topics: dict[str, TopicInfo] = {}
        for conn in self._reader.connections:
            prev = topics.get(conn.topic)
            topics[conn.topic] = TopicInfo(conn.topic, conn.msgtype, conn.msgcount + (prev.count if prev else 0))
        self.topics = topics
        #: reason -> number of messages skipped because they could not be deserialized or decoded
        self.skipped: Counter[str] = Counter()

    def _salvage(self, target: Path, exc: Exception) -> Any:
        """A truncated MCAP file read up to its cut (:mod:`ecmnet_core.bags.mcap_salvage`); BagError otherwise."""
        from ecmnet_core.bags.mcap_salvage import SalvagedMcap, SalvageError

        files = [target] if target.is_file() else sorted(target.glob("*.mcap"))
        if len(files) == 1 and files[0].suffix == ".mcap":
            try:
                salvaged = SalvagedMcap(files[0])
            except (SalvageError, OSError) as err:
                raise BagError(f"bag {self.path} cannot be opened ({exc}) and nothing could be read from it: "
                               f"{err}") from exc
            self.truncation = salvaged.describe()
            log.warning("bag %s: %s; %s", self.path, exc, self.truncation)
            return salvaged
        raise BagError(f"bag {self.path} cannot be opened (corrupt or truncated storage?): {exc}") from exc

    # -------------------------------------------------------------------------------------------- metadata
    @property
    def message_count(self) -> int:
        return int(self._reader.message_count)

    @property
    def start_ns(self) -> int:
        return int(self._reader.start_time) if self.message_count else 0

    @property
    def duration_ns(self) -> int:
        return int(self._reader.duration) if self.message_count else 0

    @property
    def custom_data(self) -> dict[str, Any]:
        """``custom_data`` from metadata.yaml with the ``ecmnet.`` prefix stripped and JSON values decoded."""
        storage = getattr(self._reader, "storage", None)
        raw = getattr(getattr(storage, "metadata", None), "custom", None) or {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key.startswith(CUSTOM_PREFIX):
                try:
                    out[key[len(CUSTOM_PREFIX):]] = json.loads(value)
                except (TypeError, ValueError):
                    out[key[len(CUSTOM_PREFIX):]] = value
        return out

    def describe_topics(self) -> str:
        return "; ".join(str(t) for t in self.topics.values()) or "no topics"

    def image_topics(self) -> list[TopicInfo]:
        return [t for t in self.topics.values() if t.msgtype in IMAGE_TYPES]

    def require_topic(self, name: str, types: Iterable[str] = IMAGE_TYPES, what: str = "image topic") -> TopicInfo:
        """The topic ``name``; BagError when it is missing, of another type, or has no messages."""
        types = tuple(types)
        info = self.topics.get(name)
        if info is None:
            raise BagError(f"bag {self.path}: {what} {name!r} does not exist; topics in the bag: "
                           f"{self.describe_topics()}")
        if info.msgtype not in types:
            raise BagError(f"bag {self.path}: {what} {name!r} has unsupported message type {info.msgtype!r} "
                           f"(supported: {', '.join(types)})")
        if info.count == 0:
            raise BagError(f"bag {self.path}: {what} {name!r} has no messages")
        return info

    def resolve_topics(self, image_topic: str | None, label_topic: str | None,
                       default_label_topic: str = "/camera/labels") -> tuple[TopicInfo, TopicInfo | None]:
        """Pick the image and ground-truth label topics.

        ``image_topic`` None: the bag's only image topic other than the label topic (``make-bag`` metadata or
        ``/camera/image_raw`` break ties). ``label_topic`` None: ``default_label_topic`` if present, else no labels;
        "" disables labels. An explicitly named topic that is missing is an error.
        """
        if self.message_count == 0:
            raise BagError(f"bag {self.path} is empty (no messages)")
        meta = self.custom_data
        if label_topic is None:
            label_topic = meta.get("label_topic") or default_label_topic
            label = self.require_topic(label_topic, (IMAGE, COMPRESSED_IMAGE), "label topic") \
                if label_topic in self.topics else None
        else:
            label = self.require_topic(label_topic, (IMAGE, COMPRESSED_IMAGE), "label topic") if label_topic else None
        if image_topic is None:
            candidates = [t for t in self.image_topics() if label is None or t.name != label.name]
            preferred = [t for t in candidates if t.name in (meta.get("image_topic"), "/camera/image_raw")]
            if len(candidates) == 1 or preferred:
                image_topic = (preferred or candidates)[0].name
            elif not candidates:
                raise BagError(f"bag {self.path} has no sensor_msgs/Image or CompressedImage topic; topics in "
                               f"the bag: {self.describe_topics()}")
            else:
                raise BagError(f"bag {self.path} has several image topics ({', '.join(t.name for t in candidates)}); "
                               "choose one with --image-topic")
        image = self.require_topic(image_topic)
        if label is not None and label.name == image.name:
            raise BagError(f"bag {self.path}: image topic and label topic are both {image.name!r}")
        return image, label

    # -------------------------------------------------------------------------------------------- messages
    def messages(self, topics: Iterable[str] | None = None, start_ns: int | None = None,
                 stop_ns: int | None = None, deserialize: Iterable[str] | None = None) -> Iterator[BagMessage]:
        """Messages of ``topics`` (None: all) in receive-time order, optionally within [start_ns, stop_ns).

        Messages of the ``deserialize`` topics (None: all requested) are deserialized; others come raw with
        ``msg=None`` (so topics of custom types can be copied). Messages that fail to deserialize are skipped
        and counted; a storage failure mid-way is a BagError.
        """
        wanted = set(self.topics) if topics is None else set(topics)
        decode = wanted if deserialize is None else set(deserialize)
        connections = [c for c in self._reader.connections if c.topic in wanted]
        if not connections:
            return
        iterator = self._reader.messages(connections=connections, start=start_ns, stop=stop_ns)
        while True:
            try:
                conn, t_ns, raw = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise BagError(f"bag {self.path}: storage is corrupt or truncated while reading: {exc}") from exc
            msg, stamp, frame_id = None, None, ""
            if conn.topic in decode:
                try:
                    msg = self.typestore.deserialize_cdr(raw, conn.msgtype)
                except Exception as exc:  # truncated or garbled CDR: one bad message must not end the replay
                    self.skipped[f"{conn.topic}: undeserializable {conn.msgtype}"] += 1
                    log.warning("bag %s: skipping undeserializable %s message on %s at t=%d ns (%s)",
                                self.path, conn.msgtype, conn.topic, t_ns, exc)
                    continue
                header = getattr(msg, "header", None)
                if header is not None:
                    stamp, frame_id = stamp_to_ns(header.stamp), str(header.frame_id)
            yield BagMessage(conn.topic, conn.msgtype, int(t_ns), bytes(raw), msg, stamp, frame_id)

    def skip(self, message: BagMessage, reason: str, exc: Exception | None = None) -> None:
        """Count a message the caller could not use (e.g. an image that does not decode)."""
        self.skipped[f"{message.topic}: {reason}"] += 1
        log.warning("bag %s: skipping %s message at t=%d ns: %s%s", self.path, message.topic, message.t_ns,
                    reason, f" ({exc})" if exc else "")

    def close(self) -> None:
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None and reader.is_open:
            reader.close()

    def __enter__(self) -> BagReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _storage_suffix(target: Path) -> str:
    if target.is_file():
        return target.suffix
    meta = target / "metadata.yaml"
    return ".mcap" if "storage_identifier: mcap" in meta.read_text(errors="replace") else ".db3"
