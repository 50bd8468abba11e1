"""One camera's state inside the segmenter node: its topics, newest-frame slot, publishers and statistics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sensor_msgs.msg import CameraInfo

from ecmnet_ros.stats import ErrorCounter, LatencyWindow, LatestSlot, RateMeter
from ecmnet_ros.topics import StreamTopics

#: One warning per kind of bad message per camera in this period (the rest are counted).
WARN_PERIOD_S = 5.0


@dataclass
class Stream:
    """One camera: its topics, newest-frame slot, publishers and statistics."""

    topics: StreamTopics
    slot: LatestSlot
    name: str = ""  # the input topic fully resolved (namespace + remapping): names the camera in logs/diagnostics
    labels_topic: str = ""
    publishers: dict[str, Any] = field(default_factory=dict)
    subscriptions: list[Any] = field(default_factory=list)
    camera_info: CameraInfo | None = None
    next_due: float = 0.0
    input_rate: RateMeter = field(default_factory=RateMeter)
    output_rate: RateMeter = field(default_factory=RateMeter)
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    inference: LatencyWindow = field(default_factory=LatencyWindow)  # forward pass (Segmenter's inference_ms)
    model: LatencyWindow = field(default_factory=LatencyWindow)  # whole Segmenter call (pre/post-processing too)
    stamp_age: LatencyWindow = field(default_factory=LatencyWindow)
    errors: ErrorCounter = field(default_factory=lambda: ErrorCounter(WARN_PERIOD_S))
    processed: int = 0
    last_output: float = 0.0
    unknown_share: float = 0.0  # of the last frame: pixels below min_confidence
    no_input_noticed: bool = False  # the console was told once that no frame arrived

    def wants(self, name: str) -> bool:
        """True when the (lazy) output ``name`` has at least one subscriber."""
        pub = self.publishers.get(name)
        return pub is not None and pub.get_subscription_count() > 0


def take_ready(streams: list[Stream], condition: threading.Condition,
               stopping: Callable[[], bool]) -> list[tuple[Stream, Any]] | None:
    """The node's worker: block on ``condition`` until some camera has a frame it may process now (its rate limit
    allows it), then take the newest frame of every such camera; None once ``stopping()``."""
    with condition:
        while not stopping():
            now = time.monotonic()
            ready = [s for s in streams if s.slot.peek() and s.next_due <= now]
            if ready:
                return [(s, s.slot.take()) for s in ready]
            waiting = [s.next_due - now for s in streams if s.slot.peek()]
            condition.wait(min(waiting) if waiting else 0.5)
    return None

