"""``python -m ecmnet_ros.bench_memory --frames 10000``: the node's memory under frames of random sizes.

Starts the segmenter node as its own process (``python -m ecmnet_ros.segmenter``, the packaged model unless
``--checkpoint``/``--model``), publishes N raw ``Image`` frames to it at ``--rate`` Hz, each of a random size up to
``--max-size`` (default 3000 x 4000) and a random accepted encoding, with a share of malformed ones (``--bad``:
wrong data length, unknown encoding, a step below one row, odd 4:2:0 sizes), as a camera driver that changes
resolution or a bad publisher would. Prints the node's RSS at start (after configure), after frame 200, in the
middle and at the end, its peak, the frames answered with labels and the bad messages the node counted.

Target (issue 13): RSS after 10,000 frames within +30 % of RSS after the first 200.

``--cycles N``: instead, N deactivate -> cleanup -> configure -> activate cycles through the node's lifecycle
services while valid 360x480 frames keep arriving at ``--rate``; prints the node's RSS and OS thread count after
each cycle. Target (issue 29): RSS after cycle N within +10 % of after cycle 2, the thread count constant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

TARGET_GROWTH_PCT = 30.0
CYCLES_TARGET_PCT = 10.0
MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ecmnet_ros.bench_memory", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=10_000, help="frames published (default 10000)")
    p.add_argument("--rate", type=float, default=30.0, help="publish rate in Hz (default 30; frames the node is "
                                                             "too slow for are dropped by its newest-frame slot)")
    p.add_argument("--max-size", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"),
                   help="largest image published (default 3000 4000)")
    p.add_argument("--bad", type=float, default=0.1, help="share of malformed messages (default 0.1)")
    p.add_argument("--checkpoint", help="checkpoint for the node (default: the packaged CamVid model)")
    p.add_argument("--model", help="variant with RANDOM weights instead of a checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", choices=("mixed", "wrong-step", "fixed"), default="mixed",
                   help="mixed: valid frames of random sizes and encodings with --bad malformed ones (default); "
                        "fixed: valid bgr8 frames of --max-size only (the flat reference); "
                        "wrong-step: every frame has a wrong step (0, 1, row-1, row/2, row+3, 2^31, 2^32-1) and up "
                        "to ~150 MB of data, all rejected by the node")
    p.add_argument("--reliable-depth", type=int, default=0, metavar="N",
                   help="override the node's image subscription to reliable, keep-last N (0: the node's default "
                        "best-effort depth 1)")
    p.add_argument("--cycles", type=int, default=0, metavar="N",
                   help="measure N lifecycle cleanup/configure cycles with frames flowing instead of the stream")
    p.add_argument("--domain", type=int, help="ROS_DOMAIN_ID (default: from the pid)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _thread_names(pid: int) -> dict[str, int]:
    """OS thread names of ``pid`` with their counts (what a growing thread count is made of)."""
    names: dict[str, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as fh:
                name = fh.read().strip()
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


def _rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


class FrameMaker:
    """Random raw frames: sizes log-uniform up to ``max_size``, every accepted encoding, some malformed."""

    def __init__(self, max_size: tuple[int, int], bad: float, seed: int) -> None:
        from ecmnet_core.image_messages import SUPPORTED_ENCODINGS, encoding_info

        self.rng = np.random.default_rng(seed)
        self.encodings = list(SUPPORTED_ENCODINGS)
        self.info = {e: encoding_info(e) for e in self.encodings}
        self.max_h, self.max_w = max_size
        self.bad = bad
        # one random pool that every frame's data is cut from (random bytes per frame would cost more than the node)
        self.pool = self.rng.integers(0, 256, self.max_h * self.max_w * 8 * 3 // 2 + 64, dtype=np.uint8).tobytes()

    def fixed(self, stamp_ns: int) -> Any:
        """A valid bgr8 frame of the largest size."""
        from sensor_msgs.msg import Image

        from ecmnet_ros.runtime import make_header

        msg = Image(header=make_header(stamp_ns), height=self.max_h, width=self.max_w, encoding="bgr8",
                    step=3 * self.max_w)
        msg.data = self.pool[:3 * self.max_w * self.max_h]
        return msg

    def wrong_step(self, stamp_ns: int) -> Any:
        """A bgr8 frame whose step is wrong, with up to ~150 MB of data (log-uniform): rejected, but received."""
        from sensor_msgs.msg import Image

        from ecmnet_ros.runtime import make_header

        rng = self.rng
        h = int(np.exp(rng.uniform(0, np.log(self.max_h))))
        w = int(np.exp(rng.uniform(0, np.log(self.max_w))))
        row = 3 * w
        step = int(rng.choice([0, 1, max(row - 1, 0), row // 2, row + 3, 2 ** 31, 2 ** 32 - 1]))
        length = min(int(np.exp(rng.uniform(np.log(1024), np.log(150 * MIB)))), len(self.pool))
        msg = Image(header=make_header(stamp_ns), height=h, width=w, encoding="bgr8", step=step)
        msg.data = self.pool[:length]
        return msg

    def __call__(self, stamp_ns: int) -> tuple[Any, bool]:
        from sensor_msgs.msg import Image

        from ecmnet_core.image_messages import PACKED_422, PLANAR_420, data_rows
        from ecmnet_ros.runtime import make_header

        rng = self.rng
        h = int(np.exp(rng.uniform(0, np.log(self.max_h))))
        w = int(np.exp(rng.uniform(0, np.log(self.max_w))))
        encoding = self.encodings[rng.integers(len(self.encodings))]
        info = self.info[encoding]
        if encoding in PLANAR_420:
            h, w = max(2, h - h % 2), max(2, w - w % 2)
        elif encoding in PACKED_422:
            w = max(2, w - w % 2)
        row = w * info.channels * np.dtype(info.dtype).itemsize
        step = row + int(rng.integers(0, 2)) * int(rng.integers(1, 64))
        rows = data_rows(encoding, h)
        length = step * rows
        valid = True
        if rng.random() < self.bad:
            valid = False
            kind = int(rng.integers(4))
            if kind == 0:
                length = max(0, length - int(rng.integers(1, step + 1)))
            elif kind == 1:
                encoding = "bayer_xyz9"
            elif kind == 2:
                step = max(0, row - 1)
                length = step * rows
            else:  # an odd 4:2:0 height
                encoding, h = "nv12", h | 1
                w = max(2, w - w % 2)
                step, length = w, w * data_rows("nv12", h)
        msg = Image(header=make_header(stamp_ns), height=h, width=w, encoding=encoding, step=step)
        msg.data = self.pool[:length]
        return msg, valid


def _publisher_qos(reliable_depth: int) -> Any:
    """Sensor-data QoS, or reliable keep-last ``reliable_depth`` to feed a reliable subscription at full depth."""
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    if not reliable_depth:
        return qos_profile_sensor_data
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=reliable_depth, reliability=ReliabilityPolicy.RELIABLE)


def _start_node(args: argparse.Namespace) -> tuple[subprocess.Popen, list[str]]:
    """The segmenter node as its own process in namespace /mem (stderr collected into the returned list)."""
    from ecmnet_ros.runtime import isolate_discovery

    domain = isolate_discovery(args.domain)
    params = ["-p", "autostart:=true"]
    if args.checkpoint:
        params += ["-p", f"checkpoint:={args.checkpoint}"]
    if args.model:
        params += ["-p", f"model:={args.model}"]
    if getattr(args, "reliable_depth", 0):
        key = "qos_overrides./mem/image.subscription"
        params += ["-p", f"{key}.reliability:=reliable", "-p", f"{key}.history:=keep_last",
                   "-p", f"{key}.depth:={args.reliable_depth}"]
    node_cmd = [sys.executable, "-m", "ecmnet_ros.segmenter", "--ros-args", "-r", "__ns:=/mem", *params]
    proc = subprocess.Popen(node_cmd, env=dict(os.environ, ROS_DOMAIN_ID=str(domain)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stderr_tail: list[str] = []
    threading.Thread(target=lambda: [stderr_tail.append(line) for line in proc.stderr], daemon=True).start()
    return proc, stderr_tail


def _stop_node(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_cycles(args: argparse.Namespace) -> dict[str, Any]:
    """RSS and threads of the node after each of ``args.cycles`` cleanup -> configure cycles, frames flowing."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from ecmnet_core.image_messages import array_to_image
    from ecmnet_ros.runtime import Spinner, TopicCollector, make_header, ros_context, wait_for

    proc, stderr_tail = _start_node(args)
    frame = np.random.default_rng(args.seed).integers(0, 256, (360, 480, 3), dtype=np.uint8)
    stop = threading.Event()
    per_cycle: list[dict[str, float]] = []
    try:
        with ros_context() as context, Spinner(context) as spinner:
            probe = spinner.add(Node("bench_memory", context=context))
            labels = TopicCollector(probe, Image, "/mem/segmenter/labels", qos=10)
            pub = probe.create_publisher(Image, "/mem/image", qos_profile_sensor_data)
            change = probe.create_client(ChangeState, "/mem/segmenter/change_state")
            if not wait_for(lambda: "active: segmenting" in "".join(stderr_tail) or proc.poll() is not None, 300):
                raise RuntimeError("the node did not come up within 300 s")
            if proc.poll() is not None:
                raise RuntimeError("the node exited: " + "".join(stderr_tail[-20:]))

            def feed() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    pub.publish(array_to_image(frame, "bgr8", make_header(i)))
                    time.sleep(1.0 / args.rate)

            threading.Thread(target=feed, daemon=True).start()

            def transition(tid: int) -> None:
                future = change.call_async(ChangeState.Request(transition=Transition(id=tid)))
                if not wait_for(future.done, 300) or not future.result().success:
                    raise RuntimeError(f"transition {tid} failed: " + "".join(stderr_tail[-10:]))

            if not change.wait_for_service(timeout_sec=30):
                raise RuntimeError("the node's change_state service did not appear")
            for _ in range(args.cycles):
                for tid in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                            Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                    transition(tid)
                seen = len(labels.messages)
                if not wait_for(lambda n=seen: len(labels.messages) > n, 120):
                    raise RuntimeError("no labels after a cycle: " + "".join(stderr_tail[-10:]))
                time.sleep(1.0)  # a few frames through the new configuration
                per_cycle.append({"rss_mib": _rss_bytes(proc.pid)[0] / MIB, "threads": _threads(proc.pid),
                                  "thread_names": _thread_names(proc.pid)})
    finally:
        stop.set()
        _stop_node(proc)
    ref = per_cycle[min(1, len(per_cycle) - 1)]
    growth = 100.0 * (per_cycle[-1]["rss_mib"] - ref["rss_mib"]) / ref["rss_mib"]
    return {"cycles": args.cycles, "per_cycle": per_cycle, "growth_cycle2_to_last_pct": growth,
            "target_pct": CYCLES_TARGET_PCT, "threads_constant": per_cycle[-1]["threads"] == ref["threads"],
            "meets_target": growth <= CYCLES_TARGET_PCT and per_cycle[-1]["threads"] == ref["threads"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from ecmnet_ros.runtime import Spinner, TopicCollector, ros_context, wait_for

    proc, stderr_tail = _start_node(args)
    make = FrameMaker(tuple(args.max_size), args.bad, args.seed)
    marks: dict[str, Any] = {}
    try:
        with ros_context() as context, Spinner(context) as spinner:
            probe = spinner.add(Node("bench_memory", context=context))
            labels = TopicCollector(probe, Image, "/mem/segmenter/labels", qos=10)
            diags = TopicCollector(probe, DiagnosticArray, "/diagnostics", qos=10)
            pub = probe.create_publisher(Image, "/mem/image", _publisher_qos(args.reliable_depth))
            if not wait_for(lambda: "active: segmenting" in "".join(stderr_tail) or proc.poll() is not None, 300):
                raise RuntimeError("the node did not come up within 300 s")
            if proc.poll() is not None:
                raise RuntimeError("the node exited: " + "".join(stderr_tail[-20:]))
            wait_for(lambda: pub.get_subscription_count() > 0, 30)
            node_ps = psutil.Process(proc.pid)
            marks["start"] = _rss_bytes(proc.pid)[0]
            period, t0, valid_sent = 1.0 / args.rate, time.monotonic(), 0
            checkpoints: dict[int, list[str]] = {}
            one_minute = max(1, min(int(60 * args.rate), args.frames))
            for frame, name in ((min(200, args.frames), "frame_200"), (one_minute, "one_minute"),
                                (args.frames // 2, "middle")):
                checkpoints.setdefault(frame, []).append(name)
            for i in range(1, args.frames + 1):
                msg, valid = (make.wrong_step(i), False) if args.stream == "wrong-step" else \
                    (make.fixed(i), True) if args.stream == "fixed" else make(i)
                valid_sent += valid
                pub.publish(msg)
                for name in checkpoints.get(i, ()):
                    marks[name] = _rss_bytes(proc.pid)[0]
                delay = t0 + i * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if proc.poll() is not None:
                    raise RuntimeError(f"the node exited at frame {i}: " + "".join(stderr_tail[-20:]))
            elapsed = time.monotonic() - t0
            time.sleep(3.0)  # the last frame's labels and a diagnostics tick
            marks["end"], peak = _rss_bytes(proc.pid)
            cpu = node_ps.cpu_times()
            bad_counted = 0
            for msg in reversed(diags.messages):
                status = next((s for s in msg.status if s.name.endswith(": /mem/image")), None)
                if status is not None:
                    bad_counted = int({kv.key: kv.value for kv in status.values}.get("bad_messages", 0))
                    break
            answered = len(labels.messages)
    finally:
        _stop_node(proc)
    growth = 100.0 * (marks["end"] - marks["frame_200"]) / marks["frame_200"]
    growth_minute = 100.0 * (marks["end"] - marks["one_minute"]) / marks["one_minute"]
    return {
        "frames": args.frames, "publish_rate_hz": args.frames / elapsed, "valid_frames_sent": valid_sent,
        "frames_answered": answered, "bad_messages_counted": bad_counted, "node_exit_code": proc.returncode,
        "rss_mib": {k: v / MIB for k, v in marks.items()}, "peak_rss_mib": peak / MIB,
        "growth_200_to_end_pct": growth, "growth_1min_to_end_pct": growth_minute, "stream": args.stream,
        "reliable_depth": args.reliable_depth, "target_pct": TARGET_GROWTH_PCT,
        "meets_target": growth <= TARGET_GROWTH_PCT,
        "node_cpu_s": cpu.user + cpu.system,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cycles:
        result = run_cycles(args)
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        for i, c in enumerate(result["per_cycle"], 1):
            print(f"cycle {i:2d}: node RSS {c['rss_mib']:.0f} MiB, {c['threads']} threads")
        first, last = result["per_cycle"][min(1, len(result["per_cycle"]) - 1)], result["per_cycle"][-1]
        grown = {k: f"{first['thread_names'].get(k, 0)} -> {v}" for k, v in last["thread_names"].items()
                 if v != first["thread_names"].get(k, 0)}
        if grown:
            print(f"threads that changed after cycle 2: {grown}")
        print(f"growth from cycle 2 to cycle {result['cycles']}: {result['growth_cycle2_to_last_pct']:+.1f} % "
              f"(target <= +{CYCLES_TARGET_PCT:.0f} %, threads constant: "
              f"{'met' if result['meets_target'] else 'NOT met'})")
        return 0
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result["rss_mib"]
        print(f"node RSS: start {r['start']:.0f} MiB, after frame 200 {r['frame_200']:.0f} MiB, after 1 minute "
              f"{r['one_minute']:.0f} MiB, middle "
              f"{r['middle']:.0f} MiB, end {r['end']:.0f} MiB, peak {result['peak_rss_mib']:.0f} MiB")
        print(f"{result['stream']} stream, image QoS "
              f"{'reliable depth ' + str(result['reliable_depth']) if result['reliable_depth'] else 'default'}: "
              f"growth from 1 minute to the end {result['growth_1min_to_end_pct']:+.1f} %")
        print(f"growth from frame 200 to the end: {result['growth_200_to_end_pct']:+.1f} % (target <= "
              f"+{TARGET_GROWTH_PCT:.0f} %: {'met' if result['meets_target'] else 'NOT met'})")
        print(f"{result['frames']} frames at {result['publish_rate_hz']:.1f} Hz ({result['valid_frames_sent']} valid): "
              f"{result['frames_answered']} answered with labels (the rest dropped as stale by the newest-frame "
              f"slot), {result['bad_messages_counted']} bad messages counted; node exit {result['node_exit_code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
