"""Progress of a long command-line run: a bar on a terminal, otherwise a line every ``every_s`` seconds, so a
redirected run (a log file, CI, ``nohup``) still shows it is going on. Used by ``predict`` and ``replay``."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``update(n)`` adds n done items; ``close()`` ends the bar. ``enabled`` False: silent."""

    def __init__(self, desc: str, unit: str, total: int | None = None, enabled: bool = True,
                 every_s: float = 10.0) -> None:
        self.desc, self.unit, self.total, self.every_s = desc, unit, total, every_s
        self.enabled = enabled
        self.done = 0
        self.last = time.monotonic()
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            of = f" of {self.total}" if self.total else ""
            print(f"{self.desc}: {self.done}{of} {self.unit}(s) so far", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["Progress"]
