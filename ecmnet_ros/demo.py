"""``python -m ecmnet_ros.demo``: the segmenter node end to end in one process, no ROS install needed.

A built-in synthetic camera (or a rosbag with ``--bag``) publishes over real DDS to the segmenter node; a monitor
prints input/output rates, drops, end-to-end latency and the top classes every second, and writes overlay PNGs
to ``--out``. The model is the packaged CamVid checkpoint; without one the demo runs the ECMNet architecture with
random weights and says so loudly (its labels are then meaningless, the pipeline figures are still real).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ecmnet_core.bench.timing import latency_summary

BANNER = "!" * 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ecmnet_ros.demo", description=__doc__.splitlines()[0])
    src = p.add_argument_group("source")
    src.add_argument("--bag", help="replay this rosbag2 (directory, .db3 or .mcap) instead of the synthetic camera")
    src.add_argument("--image-topic", help="image topic in the bag (default: its only image topic)")
    src.add_argument("--rate", type=float, default=10.0, help="synthetic camera frame rate, Hz (default 10)")
    src.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"),
                     help="synthetic camera image size (default 360 480)")
    src.add_argument("--best-effort", action="store_true", help="publish best effort instead of reliable")
    run = p.add_argument_group("run")
    run.add_argument("--duration", type=float, default=10.0, help="seconds to run (default 10)")
    run.add_argument("--frames", type=int, help="stop after this many published frames instead")
    run.add_argument("--out", default="out/demo", help="folder for overlay PNGs and summary.json (default out/demo)")
    run.add_argument("--save", type=int, default=5, help="overlay PNGs to write (default 5)")
    run.add_argument("--top", type=int, default=3, help="classes to show in the live line (default 3)")
    model = p.add_argument_group("model (node parameters)")
    model.add_argument("--checkpoint", help="checkpoint file (default: the packaged CamVid model)")
    model.add_argument("--model", help="run this variant with RANDOM weights (baseline, lines, lines_msau, ecmnet)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    model.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                       help="network input size (default: the checkpoint's; 0 0 = native)")
    model.add_argument("--alpha", type=float, default=0.5, help="overlay alpha (default 0.5)")
    return p


def choose_model(args: argparse.Namespace) -> dict[str, Any]:
    """Node parameters for the model; falls back to random ECMNet weights (loudly) without a packaged model."""
    from ecmnet_core.checkpoint import DEFAULT_CHECKPOINT

    if args.checkpoint:
        return {"checkpoint": str(Path(args.checkpoint).expanduser())}
    if args.model:
        return {"model": args.model}
    if DEFAULT_CHECKPOINT.is_file():
        return {}
    print(f"{BANNER}\nNO TRAINED MODEL: the packaged checkpoint {DEFAULT_CHECKPOINT} does not exist yet.\n"
          "Running ECMNet with RANDOM WEIGHTS: labels and coverage are meaningless; rates and latency are real.\n"
          f"Pass --checkpoint FILE for a trained model.\n{BANNER}", file=sys.stderr, flush=True)
    return {"model": "ecmnet"}


class Monitor:
    """Subscribes to the node's outputs; keeps end-to-end latencies, coverage and a few overlays."""

    def __init__(self, node: Any, prefix: str, published: dict[int, float], save: int, out: Path,
                 save_period: float = 1.0) -> None:
        from sensor_msgs.msg import Image
        from std_msgs.msg import Float32MultiArray

        self.node, self.published = node, published
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.labels_count = 0
        self.coverage: np.ndarray | None = None
        self.coverage_sum: np.ndarray | None = None
        self.saved: list[str] = []
        self.save, self.out, self.save_period = save, out, save_period
        self._last_save = -1e9
        node.create_subscription(Image, f"{prefix}/labels", self._on_labels, 10)
        node.create_subscription(Float32MultiArray, f"{prefix}/coverage", self._on_coverage, 10)
        if save > 0:
            node.create_subscription(Image, f"{prefix}/overlay", self._on_overlay, 10)

    def _on_labels(self, msg: Any) -> None:
        from ecmnet_ros.runtime import stamp_ns

        sent = self.published.get(stamp_ns(msg.header))
        with self.lock:
            self.labels_count += 1
            if sent is not None:
                self.latencies.append((time.monotonic() - sent) * 1000.0)

    def _on_coverage(self, msg: Any) -> None:
        cov = np.asarray(msg.data, np.float64)
        with self.lock:
            self.coverage = cov
            self.coverage_sum = cov if self.coverage_sum is None else self.coverage_sum + cov

    def _on_overlay(self, msg: Any) -> None:
        from ecmnet_core.image_messages import image_to_bgr8

        now = time.monotonic()
        if len(self.saved) >= self.save or now - self._last_save < self.save_period:
            return  # at most one PNG per save_period, so the files show the scene moving
        self._last_save = now
        path = self.out / f"overlay_{len(self.saved):03d}.png"
        cv2.imwrite(str(path), image_to_bgr8(msg))
        self.saved.append(str(path))


def _p50_p95(values: list[float]) -> tuple[float, float]:
    s = latency_summary(values)
    return (s["p50"], s["p95"]) if s["count"] else (float("nan"), float("nan"))


def _top(coverage: np.ndarray | None, names: list[str], k: int) -> str:
    if coverage is None or not len(coverage):
        return "-"
    order = np.argsort(coverage)[::-1][:k]
    return ", ".join(f"{names[i]} {coverage[i] * 100:.0f}%" for i in order)


class BagSource:
    """Publishes one image topic of a bag (raw CDR, no re-serialisation) paced by its recorded times, looping."""

    def __init__(self, path: str, image_topic: str | None) -> None:
        from ecmnet_core.bags.reader import COMPRESSED_IMAGE, BagReader

        self.reader = BagReader(path)
        info, _ = self.reader.resolve_topics(image_topic, None)  # None: a ground-truth label topic is skipped
        self.topic_name, self.msgtype = info.name, info.msgtype
        self.compressed = info.msgtype == COMPRESSED_IMAGE
        self.count = 0
        self.published: dict[int, float] = {}
        self.pub: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bag-source", daemon=True)

    def start(self, node: Any, topic: str) -> None:
        from sensor_msgs.msg import CompressedImage, Image

        self.pub = node.create_publisher(CompressedImage if self.compressed else Image,
                                         topic + ("/compressed" if self.compressed else ""), 10)
        self._thread.start()

    def _run(self) -> None:
        loop, offset = 0, 0
        while not self._stop.is_set():
            first = last = None
            start = time.monotonic()
            for message in self.reader.messages([self.topic_name]):
                first = message.t_ns if first is None else first
                last = message.t_ns
                delay = start + (message.t_ns - first) / 1e9 - time.monotonic()
                if self._stop.wait(max(0.0, delay)):
                    return
                raw = message.raw  # rclpy publishers accept serialized bytes: no re-serialisation on the 1st pass
                stamp = message.stamp_ns
                if offset and message.msg is not None and stamp is not None:
                    stamp += offset  # later passes get fresh stamps, so results stay matched to their frame
                    message.msg.header.stamp.sec, message.msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
                    raw = self.reader.typestore.serialize_cdr(message.msg, self.msgtype).tobytes()
                if stamp is not None:
                    self.published[stamp] = time.monotonic()
                    if len(self.published) > 1000:  # bounded over long runs: the newest stamps are enough
                        for key in sorted(self.published)[:500]:
                            del self.published[key]
                self.pub.publish(raw)
                self.count += 1
            if first is None:
                return
            loop += 1
            offset = loop * (last - first + 100_000_000)  # bag span + 0.1 s per pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.reader.close()


def run(args: argparse.Namespace) -> int:
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from ecmnet_ros.runtime import Spinner, isolate_discovery, ros_context
    from ecmnet_ros.segmenter import SegmenterNode
    from ecmnet_ros.synthetic import SyntheticCamera

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("overlay_*.png"):
        old.unlink()
    domain = isolate_discovery()
    params: dict[str, Any] = {**choose_model(args), "device": args.device, "overlay_alpha": args.alpha}
    if args.input_size:
        params["input_size"] = list(args.input_size)
    bag = BagSource(args.bag, args.image_topic) if args.bag else None
    if bag is not None:
        params["compressed"] = bag.compressed
    print(f"ecmnet demo: ROS_DOMAIN_ID={domain}, discovery localhost only; loading the model ...", flush=True)

    with ros_context() as context:
        # remapped like a launch file would: the node reads "image", the camera publishes /camera/image_raw
        node = SegmenterNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
                             cli_args=["--ros-args", "-r", "image:=/camera/image_raw",
                                       "-r", "image/compressed:=/camera/image_raw/compressed",
                                       "-r", "camera_info:=/camera/camera_info"])
        spinner = Spinner(context, num_threads=4)
        spinner.add(node)
        try:
            if not node.bring_up():
                print(f"segmenter failed to start: {node.diagnostics().status[0].message}", file=sys.stderr)
                return 1
            if bag is not None:
                source: Any = bag
                source_text = f"bag {args.bag} ({bag.topic_name}, {bag.msgtype}, looping)"
            else:
                source = spinner.add(SyntheticCamera(rate=args.rate, size=tuple(args.size), frames=args.frames,
                                                     reliable=not args.best_effort, context=context))
                source_text = f"synthetic camera {args.size[0]}x{args.size[1]} @ {args.rate:g} Hz"
            monitor = Monitor(spinner.add(Node("demo_monitor", context=context)), "/segmenter", source.published,
                              args.save, out)
            names = list(node.segmenter.class_names)
            facts = node.segmenter.describe()
            print(f"source: {source_text}\nmodel: {facts['model']} ({facts['checkpoint']}), device "
                  f"{node.device_description}, network input {facts['input_size']}\n"
                  "topics: /camera/image_raw -> /segmenter/labels, /segmenter/overlay, /segmenter/coverage, "
                  "/diagnostics", flush=True)
            spinner.start()
            if bag is not None:
                bag.start(spinner.add(Node("demo_bag_player", context=context)), "/camera/image_raw")
            summary = _live_loop(args, node, source, monitor, names)
        finally:
            if bag is not None:
                bag.stop()
            spinner.stop()

    summary["overlays"] = monitor.saved
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {len(monitor.saved)} overlay PNGs and summary.json to {out}/")
    return 0


def _live_loop(args: argparse.Namespace, node: Any, source: Any, monitor: Monitor, names: list[str]) -> dict:
    stream = node.streams[0]
    start = time.monotonic()
    last_count = 0
    while True:
        time.sleep(1.0)
        elapsed = time.monotonic() - start
        with monitor.lock:
            p50, p95 = _p50_p95(monitor.latencies[-50:])
            coverage = monitor.coverage
        (inf50,) = stream.inference.percentiles(50)
        sent = source.count
        print(f"[{elapsed:5.1f}s] in {stream.input_rate.rate():5.1f} Hz  out {stream.output_rate.rate():5.1f} Hz  "
              f"sent {sent}  segmented {stream.processed}  dropped {stream.slot.dropped}  "
              f"latency p50 {p50:6.1f} ms p95 {p95:6.1f} ms  inference {inf50:6.1f} ms  | "
              f"{_top(coverage, names, args.top)}", flush=True)
        finished = args.frames is not None and sent >= args.frames and stream.processed + stream.slot.dropped >= \
            stream.slot.received and sent == last_count
        last_count = sent
        if finished or (args.frames is None and elapsed >= args.duration):
            break
    with monitor.lock:
        p50, p95 = _p50_p95(monitor.latencies)
        mean_cov = monitor.coverage_sum / max(1, monitor.labels_count) if monitor.coverage_sum is not None else None
    (inf50, inf95) = stream.inference.percentiles(50, 95)
    summary = {
        "frames_sent": source.count, "frames_received": stream.slot.received, "frames_segmented": stream.processed,
        "frames_dropped": stream.slot.dropped, "bad_messages": stream.errors.total,
        "output_rate_hz": stream.processed / max(1e-9, time.monotonic() - start),
        "latency_ms": {"p50": p50, "p95": p95}, "inference_ms": {"p50": inf50, "p95": inf95},
        "random_weights": node.segmenter.random_weights,
        "mean_coverage": {n: float(c) for n, c in zip(names, mean_cov)} if mean_cov is not None else {},
    }
    print(f"done: {summary['frames_segmented']} of {summary['frames_sent']} frames segmented "
          f"({summary['frames_dropped']} stale frames dropped), end-to-end latency p50 {p50:.1f} ms p95 {p95:.1f} ms, "
          f"inference p50 {inf50:.1f} ms; mean coverage: {_top(mean_cov, names, max(args.top, 5))}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or (args.frames is not None and args.frames <= 0):
        build_parser().error("--duration and --frames must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
