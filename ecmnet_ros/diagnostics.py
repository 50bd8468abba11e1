"""Minimal ``diagnostic_updater`` replacement (that package is not on PyPI): status building and device facts."""

from __future__ import annotations

import math
from typing import Any

import torch
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def make_status(name: str, level: bytes, message: str, hardware_id: str, values: dict[str, Any]) -> DiagnosticStatus:
    """A ``DiagnosticStatus`` with every value formatted as a string (floats with 2 decimals)."""
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=_fmt(v)) for k, v in values.items()])


def device_facts(device: torch.device | None) -> tuple[str, dict[str, Any]]:
    """(hardware_id, values) for a torch device: GPU name and memory in MiB, or ``cpu``."""
    if device is None:
        return "none", {}
    if device.type != "cuda":
        return "cpu", {"gpu_memory_allocated_mib": "n/a (cpu)", "gpu_memory_reserved_mib": "n/a (cpu)"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index), {
        "gpu_memory_allocated_mib": torch.cuda.memory_allocated(index) / 2**20,
        "gpu_memory_reserved_mib": torch.cuda.memory_reserved(index) / 2**20,
    }
