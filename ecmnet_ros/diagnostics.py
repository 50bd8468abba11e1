"""The node's ``/diagnostics``: a minimal ``diagnostic_updater`` replacement (that package is not on PyPI) -
status building, device facts, and the statuses of the model, each camera and the point painter."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

if TYPE_CHECKING:
    from ecmnet_core.inference import Segmenter
    from ecmnet_ros.painting import PointPainter
    from ecmnet_ros.stream import Stream

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


def node_statuses(name: str, segmenter: Segmenter | None, streams: list[Stream], painter: PointPainter | None,
                  *, active: bool, configured: bool, device_note: str, last_error: str,
                  max_rate_hz: float) -> list[DiagnosticStatus]:
    """Everything the node reports on ``/diagnostics``: one status for the model and device, one per camera, one
    for the point painter when it paints."""
    seg = segmenter
    state = "active" if active else ("inactive" if configured else "unconfigured")
    hardware_id, device_values = device_facts(seg.device if seg else None)
    values: dict[str, Any] = {"state": state}
    if seg is not None:
        facts = seg.describe()
        values.update(model=facts["model"], checkpoint=facts["checkpoint"],
                      checkpoint_hash=facts["checkpoint_hash"], random_weights=seg.random_weights,
                      device=device_note, dtype=facts["dtype"], scan_backend=facts["scan_backend"],
                      input_size=facts["input_size"], classes=facts["classes"], **device_values)
        if "cpu_precision" in facts:  # what dtype auto chose on this CPU, and why
            values["cpu_precision"] = facts["cpu_precision"]
    if last_error:
        level, message = ERROR, last_error
    elif seg is None:
        level, message = WARN, f"{state}: no model loaded"
    elif seg.random_weights:
        level, message = WARN, f"{state}: RANDOM WEIGHTS, output is meaningless"
    else:
        level, message = (OK if active else WARN), f"{state} on {device_note}"
    statuses = [make_status(f"{name}: model", level, message, hardware_id, values)]
    now = time.monotonic()
    for stream in streams:
        statuses.append(stream_status(name, stream, now, hardware_id, active, max_rate_hz))
    if painter is not None:
        statuses.append(points_status(name, painter, hardware_id, active))
    return statuses


def stream_status(name: str, stream: Stream, now: float, hardware_id: str, active: bool,
                  max_rate_hz: float) -> DiagnosticStatus:
    """One camera's status: rates, frames received/processed/dropped, bad messages, latency percentiles."""
    lat50, lat95, latmax = stream.latency.percentiles(50, 95, 100)
    inf50, inf95 = stream.inference.percentiles(50, 95)
    (model50,) = stream.model.percentiles(50)
    (age50,) = stream.stamp_age.percentiles(50)
    values: dict[str, Any] = {
        "input_topic": stream.name,
        "labels_topic": stream.labels_topic,
        "input_rate_hz": stream.input_rate.rate(now), "output_rate_hz": stream.output_rate.rate(now),
        "frames_received": stream.slot.received, "frames_processed": stream.processed,
        "frames_dropped_stale": stream.slot.dropped, "bad_messages": stream.errors.total,
        **{f"bad_messages_{k}": v for k, v in sorted(stream.errors.counts.items())},
        "last_bad_message": stream.errors.last_message or "-",
        "latency_p50_ms": lat50, "latency_p95_ms": lat95, "latency_max_ms": latmax,
        "inference_p50_ms": inf50, "inference_p95_ms": inf95, "model_call_p50_ms": model50,
        "node_overhead_p50_ms": lat50 - model50, "stamp_age_p50_ms": age50,
        "max_rate_hz": max_rate_hz, "unknown_share_last_frame": stream.unknown_share,
    }
    if not active:
        level, message = WARN, "inactive"
    elif stream.input_rate.rate(now) == 0.0:
        level, message = WARN, "no input frames in the last 2 s"
    elif now - stream.last_output > 2.0:
        level, message = WARN, "receiving frames but no output in the last 2 s"
    else:
        level, message = OK, "segmenting"
    if stream.errors.total:
        message += f"; {stream.errors.total} bad messages"
    return make_status(f"{name}: {stream.name}", level, message, hardware_id, values)


def points_status(name: str, painter: PointPainter, hardware_id: str, active: bool) -> DiagnosticStatus:
    """The point painter's status: clouds received/painted, bad clouds."""
    values = painter.values()
    s = painter.stats
    if not active:
        level, message = WARN, "inactive"
    elif s.clouds_received == 0:
        level, message = WARN, "no point clouds received"
    elif s.clouds_painted == 0:
        level, message = WARN, "receiving clouds, none painted yet"
    else:
        level, message = OK, "painting"
    if s.errors.total:
        message += f"; {s.errors.total} bad clouds or painting errors"
    return make_status(f"{name}: {painter.topic}", level, message, hardware_id, values)


#: Seconds after activation without a frame before the console says so (once per camera).
NO_INPUT_NOTICE_S = 5.0


def warn_if_no_input(node: Any, streams: list[Stream], active_since: float, now: float) -> None:
    """Tell the console once per camera that no frame arrived since activation, with the topic's publisher count
    (not only ``/diagnostics``, which a first-time user does not watch)."""
    if now - active_since < NO_INPUT_NOTICE_S:
        return
    for stream in streams:
        if stream.slot.received == 0 and not stream.no_input_noticed:
            stream.no_input_noticed = True
            node.get_logger().warning(
                f"no frames on {stream.name} after {now - active_since:.0f} s ({node.count_publishers(stream.name)} "
                "publisher(s)); check the topic name, remapping and QoS")
