"""glibc allocator policy for long-running processes that see buffers of changing sizes (the node, benchmarks).

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so later buffers of
a few MiB (images, label maps, intermediate tensors) come from the per-thread heaps instead, and a heap only
shrinks from its top: with image sizes that vary, freed holes pile up and RSS ratchets upwards. The remedies:
fewer arenas (:func:`limit_arenas`) and :func:`malloc_trim` after a change of sizes (the node), or a fixed
threshold that sends every large buffer to mmap and back to the OS on free (:func:`pin_mmap_threshold`, for
peak-memory measurements; it makes every large allocation fault in fresh pages). No-ops without glibc.

CPU training is the opposite case: the same large buffers (activations and their gradients, up to ~60 MB at
batch 8 x 360 x 480) are allocated and freed every step. glibc serves anything above 32 MiB by mmap whatever its
dynamic threshold, so each of them faults in fresh zeroed pages, and frees return heap tops to the OS.
:func:`keep_freed_memory` keeps freed memory in the process for reuse instead (no mmap, no trimming): the step
runs on warm pages, and the resident size stays at the step's peak, which training reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time

MIB = 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


@functools.cache
def libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def pin_mmap_threshold(threshold: int = MIB) -> bool:
    """Serve every allocation >= ``threshold`` bytes by mmap (returned to the OS on free; no dynamic
    threshold) and trim heap tops above ``threshold``. True when glibc took both settings."""
    lib = libc()
    if lib is None or not hasattr(lib, "mallopt"):
        return False
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, threshold))


@functools.cache
def keep_freed_memory() -> bool:
    """Serve every allocation from the heaps (never mmap) and never trim them: freed memory is reused by the next
    allocation instead of being returned to the OS and faulted in again. For processes that repeat the same large
    allocations (CPU training). True when glibc took both settings."""
    lib = libc()
    if lib is None or not hasattr(lib, "mallopt"):
        return False
    return bool(lib.mallopt(_M_MMAP_MAX, 0)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def limit_arenas(count: int) -> bool:
    """At most ``count`` malloc arenas (glibc's default is 8 per core): fewer heaps to fragment, for processes
    whose many threads (DDS, executor, OpenMP) each allocate."""
    lib = libc()
    return bool(lib is not None and hasattr(lib, "mallopt") and lib.mallopt(_M_ARENA_MAX, count))


def malloc_trim() -> bool:
    """Hand free heap memory back to the OS now; True when glibc released some."""
    lib = libc()
    return bool(lib is not None and hasattr(lib, "malloc_trim") and lib.malloc_trim(0))


class TrimOnResize:
    """Return freed heap memory to the OS when the input sizes changed (at most once per ``interval_s``).

    Buffers of a new size (decoded image, label map, resized copies) leave holes of the old size in glibc's heaps,
    and a heap only shrinks from its top: a camera that changes resolution, or a publisher of random sizes, would
    ratchet RSS up. At a fixed size nothing is trimmed, so the steady state pays nothing. Call with the shapes of
    each processed batch.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._shapes: tuple[tuple[int, ...], ...] = ()
        self._last = 0.0

    def __call__(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        if shapes == self._shapes:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:  # otherwise the next batch still sees a change and trims then
            malloc_trim()
            self._last = now
            self._shapes = shapes


__all__ = ["MIB", "TrimOnResize", "keep_freed_memory", "limit_arenas", "libc", "malloc_trim", "pin_mmap_threshold"]
