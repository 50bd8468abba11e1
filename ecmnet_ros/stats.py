"""Thread-safe bookkeeping for the node: the newest-frame slot, rate meters and latency windows (no ROS inside)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecmnet_core.bench.timing import percentile


@dataclass
class Frame:
    """A received message waiting for inference; ``received`` is ``time.monotonic()`` at arrival."""

    msg: Any
    received: float


class LatestSlot:
    """Holds only the newest unprocessed frame: a slow model never builds a backlog.

    ``put`` replaces a frame nobody took yet and counts it in ``dropped``; ``take`` empties the slot.
    A shared :class:`threading.Condition` lets one worker wait on several slots (one per camera).
    """

    def __init__(self, condition: threading.Condition | None = None) -> None:
        self.condition = condition or threading.Condition()
        self._frame: Frame | None = None
        self.received = 0
        self.dropped = 0

    def put(self, msg: Any, received: float | None = None) -> bool:
        """Store ``msg``; True when it replaced an unprocessed (now dropped) frame."""
        frame = Frame(msg, time.monotonic() if received is None else received)
        with self.condition:
            replaced = self._frame is not None
            self._frame = frame
            self.received += 1
            self.dropped += int(replaced)
            self.condition.notify_all()
        return replaced

    def take(self) -> Frame | None:
        with self.condition:
            frame, self._frame = self._frame, None
            return frame

    def peek(self) -> bool:
        """True while a frame is waiting."""
        return self._frame is not None

    def clear(self) -> None:
        with self.condition:
            self._frame = None


class RateMeter:
    """Events per second over a sliding window (default 2 s)."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._times: deque[float] = deque()
        self._lock = threading.Lock()
        self.count = 0

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self.count += 1
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return len(self._times) / self.window

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()


class LatencyWindow:
    """The last ``size`` samples (milliseconds) with percentiles; bounded memory however long the node runs."""

    def __init__(self, size: int = 300) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value_ms: float) -> None:
        with self._lock:
            self._values.append(float(value_ms))

    def percentiles(self, *qs: float) -> list[float]:
        """``qs`` in 0..100; NaN for each when empty."""
        with self._lock:
            values = np.fromiter(self._values, np.float64, len(self._values))
        if values.size == 0:
            return [float("nan")] * len(qs)
        xs = values.tolist()
        return [percentile(xs, q) for q in qs]

    @property
    def last(self) -> float:
        """The newest sample (NaN when empty)."""
        with self._lock:
            return self._values[-1] if self._values else float("nan")

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


class ErrorCounter:
    """Bad-message counts per kind plus a per-kind log throttle (one warning per kind every ``period`` s)."""

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self.counts: dict[str, int] = {}
        self.last_message = ""
        self._last_logged: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, kind: str, message: str, now: float | None = None) -> bool:
        """Count one error; True when the caller should log it now (not throttled)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.last_message = message
            last = self._last_logged.get(kind)
            if last is not None and now - last < self.period:
                return False
            self._last_logged[kind] = now
            return True

    @property
    def total(self) -> int:
        return sum(self.counts.values())
