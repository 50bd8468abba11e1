"""Low-level operators: the selective scan and its backends."""

from ecmnet_core.ops.selective_scan import (
    available_backends,
    resolve_backend,
    selective_scan_fn,
    selective_scan_ref,
)

__all__ = ["available_backends", "resolve_backend", "selective_scan_fn", "selective_scan_ref"]
