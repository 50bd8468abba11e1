"""``python -m ecmnet_ros.bench --frames N --size 360 480``: what the ROS node adds on top of the model.

Publishes N synthetic frames over real DDS to an in-process segmenter node in lock-step (the next frame only after
the previous label image came back, so nothing is dropped) and measures publish -> label-received latency.

Node overhead, per frame: end-to-end latency minus the time of the model call *inside the node for that same
frame* (``Segmenter.segment_batch``, timed by the node). Pairing frame by frame cancels the noise of a busy CPU,
which otherwise swamps a difference of two separately timed distributions. Reported: the median overhead in ms and
in % of the median model time. For reference the bare model (``Segmenter.segment`` on the same images with the
node's own model instance) is also timed in the same run, interleaved frame by frame with the node frames.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import numpy as np

from ecmnet_core.bench.timing import latency_summary

TARGET_OVERHEAD_PCT = 15.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ecmnet_ros.bench", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=30, help="timed frames (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed frames first (default 3)")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"),
                   help="image size published (default 360 480)")
    p.add_argument("--checkpoint", help="checkpoint (default: the packaged CamVid model)")
    p.add_argument("--model", help="variant with RANDOM weights instead of a checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="network input size (default: the checkpoint's; 0 0 = native)")
    p.add_argument("--with-overlay", action="store_true",
                   help="also subscribe to ~/color and ~/overlay (a frame then ends when its overlay arrives)")
    p.add_argument("--compressed", action="store_true", help="publish JPEG CompressedImage instead of raw bgr8")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one frame's labels")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


class _Harness:
    """The bench's side of the graph: publishes numbered frames to the node and waits for each frame's last
    output; times the same frames through the bare Segmenter for comparison."""

    def __init__(self, args: argparse.Namespace, node: Any, bench: Any, images: list[np.ndarray]) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        self.args, self.node, self.images = args, node, images
        self.arrived: dict[int, float] = {}
        self.event = threading.Condition()
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        # the frame is complete when its last output arrived: the overlay (published after labels and colour)
        # with --with-overlay, else the label image
        last = "overlay" if args.with_overlay else "labels"
        self.labels_sub = bench.create_subscription(Image, f"/segmenter/{last}", self._on_output, reliable)
        self.extra = [bench.create_subscription(Image, f"/segmenter/{t}", lambda m: None, reliable)
                      for t in ("labels", "color")] if args.with_overlay else []
        self.pub = bench.create_publisher(CompressedImage if args.compressed else Image,
                                          "/image/compressed" if args.compressed else "/image", reliable)

    def _on_output(self, msg: Any) -> None:
        from ecmnet_ros.runtime import stamp_ns

        now = time.monotonic()
        with self.event:
            self.arrived[stamp_ns(msg.header)] = now
            self.event.notify_all()

    def connected(self) -> bool:
        from ecmnet_ros.runtime import connected

        stream = self.node.streams[0]
        return connected(self.pub, stream.subscriptions[0], self.labels_sub, *self.extra) \
            and (not self.extra or stream.wants("overlay"))

    def message(self, i: int) -> Any:
        from ecmnet_core.image_messages import array_to_compressed, array_to_image
        from ecmnet_ros.runtime import make_header

        img, header = self.images[i % len(self.images)], make_header(1_000_000_000 + i, "bench")
        return array_to_compressed(img, "jpeg", header) if self.args.compressed else array_to_image(img, "bgr8",
                                                                                                   header)

    def through_node(self, i: int) -> tuple[float, float]:
        """(end-to-end ms, the node's model-call ms for this frame)."""
        from ecmnet_ros.runtime import stamp_ns, wait_for

        stream, msg = self.node.streams[0], self.message(i)
        stamp, processed = stamp_ns(msg.header), stream.processed
        start = time.monotonic()
        self.pub.publish(msg)
        with self.event:
            if not self.event.wait_for(lambda: stamp in self.arrived, self.args.timeout):
                raise RuntimeError(f"no labels for frame {i} within {self.args.timeout} s")
            e2e = (self.arrived.pop(stamp) - start) * 1000.0
        # the node books its timings right after publishing
        if not wait_for(lambda: stream.processed > processed, 5.0):
            raise RuntimeError(f"node did not account frame {i}")
        return e2e, stream.model.last

    def bare(self, i: int) -> float:
        from ecmnet_core.image_messages import compressed_to_bgr8

        # the node decodes the JPEG: so does the bare path (same work, minus ROS)
        img = compressed_to_bgr8(self.message(i)) if self.args.compressed else self.images[i % len(self.images)]
        start = time.perf_counter()
        self.node.segmenter.segment(img)
        return (time.perf_counter() - start) * 1000.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from ecmnet_ros.demo import choose_model
    from ecmnet_ros.runtime import Spinner, isolate_discovery, ros_context, wait_for
    from ecmnet_ros.segmenter import SegmenterNode
    from ecmnet_ros.synthetic import StreetPattern

    isolate_discovery()
    params: dict[str, Any] = {**choose_model(args), "device": args.device, "compressed": args.compressed}
    if args.input_size:
        params["input_size"] = list(args.input_size)
    pattern = StreetPattern(*args.size)
    images = [pattern.frame(i * 7) for i in range(8)]

    with ros_context() as context:
        node = SegmenterNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        bench = Node("ecmnet_bench", context=context)
        spinner = Spinner(context)
        spinner.add(node)
        spinner.add(bench)
        try:
            if not node.bring_up():
                raise RuntimeError(f"segmenter failed to start: {node.diagnostics().status[0].message}")
            harness = _Harness(args, node, bench, images)
            spinner.start()
            if not wait_for(harness.connected, 20):
                raise RuntimeError("bench publisher/subscriber did not match the node within 20 s")
            stream = node.streams[0]
            for i in range(args.warmup):
                harness.through_node(i)
                harness.bare(i)
            stream.latency.clear()
            stream.inference.clear()
            e2e, in_node, model = [], [], []
            for i in range(args.frames):
                j = args.warmup + i
                if i % 2:  # alternate the order so neither path always runs right after the other
                    model.append(harness.bare(j))
                t, m = harness.through_node(j)
                e2e.append(t)
                in_node.append(m)
                if not i % 2:
                    model.append(harness.bare(j))
            return _result(args, node, e2e, in_node, model)
        finally:
            spinner.stop()


def _result(args: argparse.Namespace, node: Any, e2e: list[float], in_node: list[float],
            model: list[float]) -> dict[str, Any]:
    """The bench's JSON: latency summaries of each path, the node's own figures and the overhead."""
    stream, seg = node.streams[0], node.segmenter
    node_internal = stream.latency.percentiles(50, 95)
    inference = stream.inference.percentiles(50, 95)
    overhead = [t - m for t, m in zip(e2e, in_node)]
    facts = seg.describe()
    result = {
        "frames": args.frames, "image_size": list(args.size), "network_input": facts["input_size"],
        "model": facts["model"], "checkpoint": facts["checkpoint"], "random_weights": seg.random_weights,
        "device": node.device_description, "scan_backend": facts["scan_backend"],
        "input": "jpeg CompressedImage" if args.compressed else "bgr8 Image",
        "with_overlay": bool(args.with_overlay),
        "bare_model_ms": latency_summary(model), "node_model_call_ms": latency_summary(in_node),
        "end_to_end_ms": latency_summary(e2e), "node_overhead_ms": latency_summary(overhead),
        "node_receive_to_publish_ms": {"p50": node_internal[0], "p95": node_internal[1]},
        "node_forward_pass_ms": {"p50": inference[0], "p95": inference[1]},
        "dropped": stream.slot.dropped,
    }
    model_p50 = result["node_model_call_ms"]["p50"]
    result["overhead_pct"] = 100.0 * result["node_overhead_ms"]["p50"] / model_p50
    bare_p50 = result["bare_model_ms"]["p50"]
    result["unpaired_overhead_pct"] = 100.0 * (result["end_to_end_ms"]["p50"] - bare_p50) / bare_p50
    result["target_pct"] = TARGET_OVERHEAD_PCT
    return result


def report(result: dict[str, Any]) -> str:
    rows = [("bare model, Segmenter.segment", result["bare_model_ms"]),
            ("model call inside the node", result["node_model_call_ms"]),
            ("end to end, publish -> result", result["end_to_end_ms"]),
            ("node overhead, per frame", result["node_overhead_ms"])]
    ok = "within" if result["overhead_pct"] < result["target_pct"] else "ABOVE"
    lines = [f"ecmnet_ros bench: {result['frames']} frames {result['image_size'][0]}x{result['image_size'][1]} "
             f"({result['input']}{', +colour/overlay' if result['with_overlay'] else ''}), network input "
             f"{result['network_input']}, model {result['model']}"
             f"{' (RANDOM WEIGHTS)' if result['random_weights'] else ''}, {result['device']}"]
    lines += [f"  {name:32s} p50 {s['p50']:8.1f} ms  p95 {s['p95']:8.1f} ms  min {s['min']:8.1f} ms"
              for name, s in rows]
    lines += [f"  node overhead = {result['overhead_pct']:.1f} % of the model time (p50); target < "
              f"{result['target_pct']:g} %: {ok}   [unpaired: e2e p50 vs bare p50 = "
              f"{result['unpaired_overhead_pct']:+.1f} %]",
              f"  frames dropped: {result['dropped']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frames < 1 or args.warmup < 0:
        build_parser().error("--frames must be >= 1 and --warmup >= 0")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
