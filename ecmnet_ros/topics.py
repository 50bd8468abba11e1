"""Which topics one segmenter node reads and writes, for one camera or several (pure functions, no rclpy).

One camera (``image_topics`` unset): input ``image`` (or ``image/compressed``) and ``camera_info``, relative and
remappable; outputs under the node's private namespace ``~/labels``, ``~/color`` ...

Several cameras (``image_topics: [/front/image_raw, /rear/image_raw]``): one model serves all of them; each
camera's outputs go under ``<namespace of its topic>/<node name>/`` (``/front/segmenter/labels``), so it is always
clear which output belongs to which camera, and its camera_info is read from ``<namespace>/camera_info``.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPRESSED_SUFFIX = "/compressed"
#: Output topic names, relative to a stream's prefix.
OUTPUTS = ("labels", "confidence", "color", "overlay", "coverage", "coverage_stamped", "camera_info")


@dataclass(frozen=True)
class StreamTopics:
    """Topics of one camera: ``image`` (the subscribed name), ``camera_info``, output ``prefix``."""

    image: str
    compressed: bool
    camera_info: str
    prefix: str

    def output(self, name: str) -> str:
        return f"{self.prefix}/{name}"


def _parent(topic: str) -> str:
    """``/front/image_raw`` -> ``/front``; ``image`` -> ``""``; ``/image`` -> ``/``."""
    head, _, _ = topic.rstrip("/").rpartition("/")
    return "/" if topic.startswith("/") and not head else head


def plan_streams(image_topics: list[str] | None, compressed: bool, node_name: str) -> list[StreamTopics]:
    """The stream layout for the ``image_topics`` / ``compressed`` parameters (see the module docstring).

    Raises ValueError when two cameras would share an output namespace.
    """
    if not image_topics:
        image = "image" + (COMPRESSED_SUFFIX if compressed else "")
        return [StreamTopics(image=image, compressed=compressed, camera_info="camera_info", prefix="~")]
    streams: list[StreamTopics] = []
    owners: dict[str, str] = {}
    for topic in image_topics:
        topic = topic.strip()
        is_compressed = compressed or topic.endswith(COMPRESSED_SUFFIX)
        base = topic[: -len(COMPRESSED_SUFFIX)] if topic.endswith(COMPRESSED_SUFFIX) else topic
        parent = _parent(base)
        if parent in owners:
            raise ValueError(f"image_topics {owners[parent]!r} and {topic!r} are in the same namespace "
                             f"{parent or '(node namespace)'!r}, so their outputs would collide; put each camera "
                             "in its own namespace (e.g. /front/image_raw, /rear/image_raw)")
        owners[parent] = topic
        join = parent.rstrip("/") + "/" if parent else ""
        streams.append(StreamTopics(
            image=base + (COMPRESSED_SUFFIX if is_compressed else ""), compressed=is_compressed,
            camera_info=f"{join}camera_info", prefix=f"{join}{node_name}" if parent else "~"))
    return streams
