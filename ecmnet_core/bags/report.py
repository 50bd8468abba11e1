"""Replay results: per-frame records, accuracy, timing, and the files a replay leaves behind.

:class:`ReplayReport` is filled frame by frame by the offline and live replays and writes ``report.json`` (every
figure), ``frames.csv`` (one row per frame) and PNG plots (latency / inference time over time, per-class IoU,
per-frame mIoU and class coverage over time). :class:`LabelBagWriter` writes a copy of the input bag with the
predicted label images added on their own topic, for viewing in Foxglove or RViz.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecmnet_core.bags.reader import IMAGE, BagError, BagReader
from ecmnet_core.bench.timing import latency_summary
from ecmnet_core.data.classes import UNLABELED
from ecmnet_core.metrics import ConfusionMatrix

log = logging.getLogger(__name__)

#: frame status values: evaluated by the model / never answered by the node / not decodable
STATUSES = ("ok", "dropped", "skipped")


@dataclass
class FrameRecord:
    """One image frame of the replay.

    ``t_ns`` is the bag receive time, ``stamp_ns`` the header stamp (the key that matches predictions to ground
    truth and, live, results to published frames). ``latency_ms`` (live only) is publish -> result, wall clock.
    ``iou`` / ``miou`` are per-frame, only for frames with ground truth that were answered.
    """

    index: int
    stamp_ns: int
    t_ns: int
    name: str = ""
    loop: int = 0  # live --loop: which pass over the bag
    status: str = "ok"
    inference_ms: float | None = None
    latency_ms: float | None = None
    publish_s: float | None = None  # live: wall-clock seconds since the first publish
    has_label: bool = False
    miou: float | None = None
    pixel_accuracy: float | None = None
    iou: np.ndarray | None = None
    coverage: np.ndarray | None = None


def _num(v: Any) -> Any:
    """JSON-safe number: nan/inf -> None, numpy scalars -> Python."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class ReplayReport:
    """Accumulates a replay; ``summary()`` is the JSON-able dict of all figures, ``write(dir)`` the files."""

    def __init__(self, mode: str, class_names: Sequence[str], *, bag: dict[str, Any] | None = None,
                 segmenter: dict[str, Any] | None = None, ignore_index: int = UNLABELED,
                 palette: np.ndarray | None = None) -> None:
        self.mode = mode
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.palette = None if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        self.bag = dict(bag or {})
        self.segmenter = dict(segmenter or {})
        self.frames: list[FrameRecord] = []
        self.confusion = ConfusionMatrix(self.num_classes, ignore_index)
        self.skipped: dict[str, int] = {}
        self.unmatched_labels = 0
        #: labelled pixels the segmenter marked unknown (255, below --min-confidence): left out of the scores
        self.unknown_pixels = 0
        self.labelled_pixels = 0
        self.extra: dict[str, Any] = {}
        self.points: Any = None  # offline point painting (PointsReplay: summary(), format_text())
        #: what the replay could not do and why (a truncated bag, clouds left unpainted), one line each
        self.notes: list[str] = []

    # ------------------------------------------------------------------------------------------ filling
    def add_frame(self, record: FrameRecord, pred: np.ndarray | None = None, gt: np.ndarray | None = None) -> None:
        """Record a frame; with ``pred`` its coverage, with ``pred`` and ``gt`` its accuracy (also accumulated)."""
        if record.status not in STATUSES:
            raise ValueError(f"frame status must be one of {STATUSES}, got {record.status!r}")
        if pred is not None and record.coverage is None:
            counts = np.bincount(pred.ravel(), minlength=256)[: self.num_classes].astype(np.float64)
            record.coverage = (counts / counts.sum() if counts.sum() else counts).astype(np.float32)
        record.has_label = record.has_label or gt is not None
        if pred is not None and gt is not None:
            if pred.shape != gt.shape:
                raise BagError(f"frame {record.name or record.index} (stamp {record.stamp_ns}): ground truth is "
                               f"{gt.shape[1]}x{gt.shape[0]} but the prediction is {pred.shape[1]}x{pred.shape[0]}")
            frame_cm = ConfusionMatrix(self.num_classes, self.ignore_index)
            labelled = (gt != self.ignore_index) & (gt < self.num_classes)
            known = pred < self.num_classes
            self.labelled_pixels += int(labelled.sum())
            self.unknown_pixels += int((labelled & ~known).sum())
            frame_cm.update(pred[known], gt[known])
            self.confusion.merge(frame_cm)
            record.iou = frame_cm.iou()
            record.miou = _num(frame_cm.miou())
            record.pixel_accuracy = _num(frame_cm.pixel_accuracy())
        self.frames.append(record)

    def count_skipped(self, skipped: dict[str, int]) -> None:
        for reason, n in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    def sorted_frames(self) -> list[FrameRecord]:
        return sorted(self.frames, key=lambda r: (r.loop, r.index, r.t_ns))

    # ------------------------------------------------------------------------------------------ figures
    def summary(self) -> dict[str, Any]:
        frames = self.sorted_frames()
        answered = [f for f in frames if f.status == "ok"]
        evaluated = [f for f in answered if f.miou is not None or f.iou is not None]
        acc = self.confusion.summary(self.class_names)
        coverage = [f.coverage for f in answered if f.coverage is not None]
        mean_cov = np.mean(coverage, axis=0) if coverage else np.full(self.num_classes, np.nan)
        per_frame = [f.miou for f in evaluated if f.miou is not None]
        return {
            "mode": self.mode,
            "bag": self.bag,
            "segmenter": self.segmenter,
            "frames": {
                "total": len(frames),
                "answered": len(answered),
                "dropped": sum(f.status == "dropped" for f in frames),
                "skipped_undecodable": sum(self.skipped.values()),
                "with_label": sum(f.has_label for f in frames),
                "evaluated": len(evaluated),
                "unmatched_labels": self.unmatched_labels,
                "skipped_reasons": dict(self.skipped),
            },
            "accuracy": {
                **acc,
                "ignore_index": self.ignore_index,
                # labelled pixels marked unknown (--min-confidence): the scores count the others
                "unknown_share": self.unknown_pixels / self.labelled_pixels if self.labelled_pixels else 0.0,
                "per_frame_miou_mean": _num(np.mean(per_frame)) if per_frame else None,
            },
            "timing": {
                "inference_ms": latency_summary([f.inference_ms for f in answered if f.inference_ms is not None]),
                "latency_ms": latency_summary([f.latency_ms for f in answered if f.latency_ms is not None]),
            },
            "coverage_mean": {n: _num(v) for n, v in zip(self.class_names, mean_cov)},
            **({"live": self.extra} if self.extra else {}),
            **({"points": self.points.summary()} if self.points is not None else {}),
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def format_text(self) -> str:
        """A few lines for the console: accuracy, timing, drops."""
        s = self.summary()
        fr, tim = s["frames"], s["timing"]
        lines = [f"{self.mode} replay of {s['bag'].get('path', '?')}: {fr['total']} frames, {fr['answered']} answered, "
                 f"{fr['dropped']} dropped, {fr['skipped_undecodable']} undecodable skipped, "
                 f"{fr['evaluated']} evaluated against ground truth"]
        if fr["evaluated"]:
            lines.append(self.confusion.table(self.class_names))
        elif fr["with_label"] == 0:
            lines.append("no ground-truth labels in the bag: accuracy not measured")

        def ms(d: dict) -> str:
            return "n/a" if not d["count"] else f"p50 {d['p50']:.1f} ms, p95 {d['p95']:.1f} ms, max {d['max']:.1f} ms"

        if tim["inference_ms"]["count"] or not tim["latency_ms"]["count"]:
            warm = float(self.segmenter.get("warmup_s") or 0.0)
            lines.append(f"inference: {ms(tim['inference_ms'])}" + (
                f" (after a {warm:.1f} s warm-up before the first frame, not counted)" if warm else ""))
        if tim["latency_ms"]["count"]:
            lines.append(f"end-to-end latency: {ms(tim['latency_ms'])}")
        if self.extra:
            keys = ("published", "received", "dropped", "drop_rate", "throughput_fps", "publish_fps",
                    "lockstep_timeouts", "wall_s")
            lines.append("live: " + ", ".join(f"{k} {self.extra[k]:.3g}" if isinstance(self.extra[k], float)
                                              else f"{k} {self.extra[k]}" for k in keys if k in self.extra))
        if self.points is not None:
            lines.append(self.points.format_text())
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------ files
    def publish(self, out_dir: str | Path | None, plots: bool, output_label_topic: str | None,
                labels_from: str) -> None:
        """What the ``replay`` commands print at the end: the text report, then where files went."""
        print(self.format_text())
        if out_dir:
            paths = self.write(out_dir, plots=plots)
            print(f"report: {', '.join(str(p) for p in paths)}")
        if output_label_topic is not None:
            print(f"output bag: {self.bag['output_bag']} ({labels_from} labels on {output_label_topic})")

    def write(self, out_dir: str | Path, plots: bool = True) -> list[Path]:
        """Write ``report.json``, ``frames.csv`` and (``plots``) PNGs into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [self._write_csv(out / "frames.csv")]
        if plots:
            paths += self._write_plots(out)
        summary = self.summary()
        summary["files"] = [p.name for p in paths] + ["report.json"]
        report = out / "report.json"
        report.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        return [report, *paths]

    def _write_csv(self, path: Path) -> Path:
        names = [n.replace(",", " ") for n in self.class_names]
        header = ["loop", "index", "name", "stamp_ns", "t_s", "status", "inference_ms", "latency_ms", "publish_s",
                  "has_label", "miou", "pixel_accuracy", *(f"iou_{n}" for n in names), *(f"cov_{n}" for n in names)]
        t0 = min((f.t_ns for f in self.frames), default=0)

        def cell(v: Any, digits: int = 6) -> str:
            if v is None:
                return ""
            if isinstance(v, float | np.floating):
                return "" if not math.isfinite(v) else f"{v:.{digits}g}"
            return str(v)

        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for f in self.sorted_frames():
                iou = f.iou if f.iou is not None else [None] * self.num_classes
                cov = f.coverage if f.coverage is not None else [None] * self.num_classes
                w.writerow([f.loop, f.index, f.name, f.stamp_ns, f"{(f.t_ns - t0) / 1e9:.6f}", f.status,
                            cell(f.inference_ms), cell(f.latency_ms), cell(f.publish_s), int(f.has_label),
                            cell(f.miou), cell(f.pixel_accuracy), *(cell(v) for v in iou), *(cell(v) for v in cov)])
        return path

    def _colours(self) -> list[tuple[float, float, float]]:
        if self.palette is not None and len(self.palette) == self.num_classes:
            return [tuple(c / 255.0 for c in rgb) for rgb in self.palette.tolist()]
        import matplotlib

        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i % 20)[:3] for i in range(self.num_classes)]

    def _write_plots(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")  # no display on robots and CI
        import matplotlib.pyplot as plt

        frames = self.sorted_frames()
        t0 = min((f.t_ns for f in frames), default=0)
        paths: list[Path] = []

        # latency over wall time (live) or inference time over bag time (offline), drops marked on the axis
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ok = [f for f in frames if f.status == "ok"]
        live = any(f.latency_ms is not None for f in ok)
        key = "latency_ms" if live else "inference_ms"

        def when(f: FrameRecord) -> float:
            return (f.publish_s or 0.0) if live else (f.t_ns - t0) / 1e9

        t = [when(f) for f in ok if getattr(f, key) is not None]
        v = [getattr(f, key) for f in ok if getattr(f, key) is not None]
        ax.plot(t, v, ".-", lw=0.8, ms=3, label="end-to-end latency" if key == "latency_ms" else "inference time")
        if v:
            for q, style in ((50, "--"), (95, ":")):
                ax.axhline(np.percentile(v, q), color="grey", ls=style, lw=0.8, label=f"p{q}")
        dropped = [when(f) for f in frames if f.status == "dropped"]
        if dropped:
            ax.plot(dropped, [0] * len(dropped), "x", color="red", ms=4, label=f"dropped ({len(dropped)})")
        ax.set_xlabel("wall time since the first frame [s]" if live else "bag time [s]")
        ax.set_ylabel("ms")
        ax.set_title(f"{self.mode} replay: {'latency' if key == 'latency_ms' else 'inference time'} per frame")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(self._save(fig, out / "latency.png"))

        # per-class IoU bars
        iou = self.confusion.iou()
        fig, ax = plt.subplots(figsize=(9, 0.35 * self.num_classes + 1.2))
        y = np.arange(self.num_classes)
        ax.barh(y, np.nan_to_num(iou * 100.0), color=self._colours(), edgecolor="black", lw=0.5)
        ax.set_yticks(y, self.class_names)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("IoU [%]")
        miou = self.confusion.miou()
        if math.isfinite(miou):
            ax.axvline(miou * 100.0, color="black", ls="--", lw=1, label=f"mIoU {miou * 100:.2f}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title("per-class IoU" + ("" if self.confusion.matrix.sum() else " (no ground truth)"))
        paths.append(self._save(fig, out / "per_class_iou.png"))

        # per-frame mIoU and stacked class coverage over bag time
        cov = [f for f in ok if f.coverage is not None]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(1, 2))
        ev = [f for f in ok if f.miou is not None]
        ax1.plot([(f.t_ns - t0) / 1e9 for f in ev], [f.miou * 100.0 for f in ev], ".-", lw=0.8, ms=3)
        ax1.set_ylabel("frame mIoU [%]")
        ax1.grid(alpha=0.3)
        if cov:
            tc = [(f.t_ns - t0) / 1e9 for f in cov]
            ax2.stackplot(tc, np.stack([f.coverage for f in cov], axis=1), labels=self.class_names,
                          colors=self._colours())
            ax2.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("coverage (fraction)")
        ax2.set_xlabel("bag time [s]")
        fig.suptitle("per-frame accuracy and class coverage")
        paths.append(self._save(fig, out / "coverage.png"))
        return paths

    @staticmethod
    def _save(fig: Any, path: Path) -> Path:
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@dataclass
class LabelBagWriter:
    """A copy of the source bag (every topic, raw) plus predicted mono8 label images on ``label_topic``.

    Messages are written as they come (``write_raw`` for copies, ``write_labels`` for predictions); the bag is
    built in a staging folder and moved to ``path`` on :meth:`close`, removed on :meth:`abort`.
    """

    path: Path
    source: BagReader
    label_topic: str = "/segmenter/labels"
    storage: str | None = None  # None: the source's storage plugin
    _conns: dict[str, Any] = field(default_factory=dict, init=False)
    _dropped_topics: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(self.path)
        if self.path.exists():
            raise BagError(f"--output-bag {self.path} already exists; choose a new path")
        if self.label_topic in self.source.topics:
            raise BagError(f"--output-label-topic {self.label_topic!r} already exists in bag {self.source.path}")
        storage = self.storage or self.source.storage
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._staging = self.path.with_name(f".{self.path.name}.partial")
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir()
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self._staging / self.path.name, version=9, storage_plugin=plugin)
        self._writer.open()
        ts = self.source.typestore
        for conn in self.source._reader.connections:
            if conn.topic in self._conns:
                continue
            qos = list(getattr(conn.ext, "offered_qos_profiles", []) or [])
            try:
                if conn.msgdef.data and conn.digest:
                    new = self._writer.add_connection(conn.topic, conn.msgtype, msgdef=conn.msgdef.data,
                                                      rihs01=conn.digest, offered_qos_profiles=qos)
                else:
                    new = self._writer.add_connection(conn.topic, conn.msgtype, typestore=ts, offered_qos_profiles=qos)
            except Exception as exc:  # a custom type without a stored definition: leave that topic out
                log.warning("output bag: leaving out %s [%s]: no message definition (%s)", conn.topic, conn.msgtype,
                            exc)
                self._dropped_topics.add(conn.topic)
                continue
            self._conns[conn.topic] = new
        from ecmnet_core.bags.make_bag import qos_profile

        self._label_conn = self._writer.add_connection(self.label_topic, IMAGE, typestore=ts,
                                                       offered_qos_profiles=[qos_profile()])
        self._image_cls = ts.types[IMAGE]
        self._header_cls = ts.types["std_msgs/msg/Header"]
        self._time_cls = ts.types["builtin_interfaces/msg/Time"]
        self.labels_written = 0

    def write_raw(self, topic: str, t_ns: int, raw: bytes) -> None:
        if topic in self._conns:
            self._writer.write(self._conns[topic], t_ns, raw)

    def write_labels(self, t_ns: int, stamp_ns: int, frame_id: str, labels: np.ndarray) -> None:
        from ecmnet_core.image_messages import array_to_image

        header = self._header_cls(stamp=self._time_cls(sec=stamp_ns // 1_000_000_000,
                                                       nanosec=stamp_ns % 1_000_000_000), frame_id=frame_id)
        msg = array_to_image(np.ascontiguousarray(labels, dtype=np.uint8), "mono8", header, self._image_cls)
        self._writer.write(self._label_conn, t_ns, self.source.typestore.serialize_cdr(msg, IMAGE))
        self.labels_written += 1

    def close(self) -> Path:
        self._writer.close()
        (self._staging / self.path.name).rename(self.path)
        self._staging.rmdir()
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - best effort: the staging folder is removed anyway
            pass
        shutil.rmtree(self._staging, ignore_errors=True)
