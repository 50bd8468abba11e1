"""Live rosbag replay: publish a bag's image topic into a running segmenter node and measure what comes back.

Playback follows ``ros2 bag play`` (receive-time order, wall pacing ``(t - t_first) / rate``, ``--loop``,
``--start-offset``, ``--remap``, optional ``/clock`` for ``use_sim_time``). The raw CDR bytes from the bag are
published as they are (rclpy accepts serialized messages), so nothing is re-encoded. The node's
``<ns>/<node>/labels`` (and ``coverage_stamped``) results are matched to the published frames by header stamp:

* end-to-end latency (publish -> label received, wall clock), throughput, frames the node never answered (dropped;
  the node keeps only the newest frame, so a model slower than the bag drops frames instead of queueing them);
* accuracy against the bag's ground-truth label topic for the frames that came back.

``lockstep`` publishes the next frame only after the previous result arrived (or ``timeout``), so every frame is
evaluated. ``spawn_node`` runs :class:`ecmnet_ros.segmenter.SegmenterNode` in this process, on the same executor,
so the whole measurement works from a fresh clone without a ROS install.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from ecmnet_core.bags.reader import COMPRESSED_IMAGE, BagError, BagMessage, BagReader, decode_label_message
from ecmnet_core.bags.replay import frame_names
from ecmnet_core.bags.report import FrameRecord, LabelBagWriter, ReplayReport
from ecmnet_core.image_messages import ImageConversionError, check_message, image_to_array
from ecmnet_core.progress import Progress
from ecmnet_ros.runtime import Spinner, ros_context, stamp_ns

log = logging.getLogger(__name__)

#: bag time read ahead of the frame being published, so its ground truth is at hand when the result comes back
READ_AHEAD_NS = 1_000_000_000
#: how often the player checks for Ctrl-C / stop while it sleeps until the next frame
SLEEP_SLICE_S = 0.05


#: GIL switch interval while a spawned (in-process) node shares the interpreter with the publisher.
SPAWNED_SWITCH_INTERVAL_S = 0.0005


@dataclass
class LiveReplayConfig:
    """Options of a live replay (the ``replay --live`` flags)."""

    bag: str
    image_topic: str | None = None
    label_topic: str | None = None
    rate: float = 1.0
    loop: bool = False
    duration: float | None = None
    start_offset: float = 0.0
    max_frames: int | None = None
    remap: dict[str, str] = field(default_factory=dict)
    clock_hz: float | None = None
    qos: str = "reliable"
    lockstep: bool = False
    timeout: float = 5.0
    namespace: str = ""
    node_name: str = "segmenter"
    result_topic: str | None = None
    spawn_node: bool = False
    node_parameters: dict[str, Any] = field(default_factory=dict)
    wait: float = 20.0
    drain: float = 3.0
    num_classes: int | None = None
    output_bag: str | None = None
    output_label_topic: str = "/segmenter/labels"

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"--rate must be > 0, got {self.rate}")
        if self.clock_hz is not None and not self.clock_hz > 0:
            raise ValueError(f"--clock must be > 0 Hz, got {self.clock_hz}")
        if self.qos not in ("reliable", "best_effort"):
            raise ValueError(f"--qos must be reliable or best_effort, got {self.qos!r}")
        for name, value in (("--timeout", self.timeout), ("--wait", self.wait), ("--drain", self.drain)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        if self.start_offset < 0:
            raise ValueError(f"--start-offset must be >= 0 seconds, got {self.start_offset}")
        if self.namespace and not self.namespace.startswith("/"):
            self.namespace = "/" + self.namespace
        self.namespace = self.namespace.rstrip("/")

    @property
    def labels_topic(self) -> str:
        """The node's label output: ``--result-topic`` or ``<ns>/<node>/labels``."""
        return self.result_topic or f"{self.namespace}/{self.node_name}/labels"

    @property
    def coverage_topic(self) -> str:
        return self.labels_topic.rsplit("/", 1)[0] + "/coverage_stamped"


def parse_remaps(rules: list[str]) -> dict[str, str]:
    """``["/a:=/b", ...]`` -> ``{"/a": "/b"}``; malformed rules are a ValueError naming the rule."""
    out: dict[str, str] = {}
    for rule in rules:
        src, sep, dst = rule.partition(":=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"--remap {rule!r} must look like /from:=/to")
        out[src.strip()] = dst.strip()
    return out


@dataclass
class _Pending:
    record: FrameRecord
    published: float  # time.perf_counter() at publish
    seq: int
    key: int  # the header stamp as published (differs from record.stamp_ns in later --loop passes)


def restamp(raw: bytes, stamp_ns: int) -> bytes:
    """Serialized Image / CompressedImage with its header stamp replaced (the header is the first field).

    CDR: 4-byte encapsulation header (byte 1: 0 = big endian, 1 = little endian), then int32 sec, uint32 nanosec.
    """
    if len(raw) < 12 or raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError("not a CDR-serialized message with a header")
    order = "little" if raw[1] == 1 else "big"
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    return raw[:4] + sec.to_bytes(4, order, signed=True) + nanosec.to_bytes(4, order) + raw[12:]


class _ReplayNode(Node):
    """The player: image publisher, optional /clock, subscriptions to the node's results."""

    def __init__(self, replay: LiveReplay, context: Any) -> None:
        super().__init__("ecmnet_replay", context=context)
        self.replay = replay
        cfg = replay.config
        reliability = ReliabilityPolicy.RELIABLE if cfg.qos == "reliable" else ReliabilityPolicy.BEST_EFFORT
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=reliability,
                         durability=DurabilityPolicy.VOLATILE)
        msg_type = CompressedImage if replay.image.msgtype == COMPRESSED_IMAGE else Image
        self.image_pub = self.create_publisher(msg_type, replay.publish_topic, qos)
        self.clock_pub = None
        if cfg.clock_hz:
            from rosgraph_msgs.msg import Clock

            self._clock_type = Clock
            self.clock_pub = self.create_publisher(Clock, "/clock", 10)
            self._clock_order = threading.Lock()
            self.create_timer(1.0 / cfg.clock_hz, self._publish_clock)
        # results: reliable like the node's publishers, deep enough never to lose one while we score the last
        result_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.VOLATILE)
        self.label_sub = self.create_subscription(Image, cfg.labels_topic, replay.on_labels, result_qos)
        self.coverage_sub = self.create_subscription(DiagnosticArray, cfg.coverage_topic, replay.on_coverage,
                                                     result_qos)

    def _publish_clock(self) -> None:
        from builtin_interfaces.msg import Time

        with self._clock_order:  # compute and publish as one step, so /clock messages leave in time order
            t = self.replay.bag_now()
            if t is not None:
                stamp = Time(sec=t // 1_000_000_000, nanosec=t % 1_000_000_000)
                self.clock_pub.publish(self._clock_type(clock=stamp))


class LiveReplay:
    """One live replay run: ``LiveReplay(config).run()`` -> :class:`ReplayReport`."""

    def __init__(self, config: LiveReplayConfig) -> None:
        self.config = config
        self.reader = BagReader(config.bag)
        self.image, self.label = self.reader.resolve_topics(config.image_topic, config.label_topic)
        self.publish_topic = config.remap.get(self.image.name, self.image.name)
        unknown = [t for t in config.remap if t not in self.reader.topics]
        if unknown:
            raise BagError(f"--remap: topic(s) {unknown} are not in bag {self.reader.path}; topics in the bag: "
                           f"{self.reader.describe_topics()}")
        if config.output_bag and Path(config.output_bag).exists():
            raise BagError(f"--output-bag {config.output_bag} already exists; choose a new path")
        self.start_ns = self.reader.start_ns + int(config.start_offset * 1e9) if config.start_offset else None
        self._lock = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._gt: dict[int, np.ndarray] = {}
        self._node_coverage: dict[int, np.ndarray] = {}
        self._answered: dict[int, FrameRecord] = {}  # published stamp -> record, for the node's coverage
        self._seq = 0
        self._clock: tuple[float, int] | None = None  # (wall anchor, bag anchor) while playing
        self._clock_hold: int | None = None  # bag time while paused (lock-step wait)
        self._clock_last: int | None = None  # the latest /clock value handed out
        self._writer: LabelBagWriter | None = None
        self._progress = Progress("replay --live", "frame", enabled=False)
        self._to_write: list[tuple[int, int, str, np.ndarray]] = []
        self._write_pass = True
        self.unexpected_results = 0
        self.lockstep_timeouts = 0
        self.report: ReplayReport | None = None
        self._first_publish: float | None = None
        self._last_result: float | None = None

    # ------------------------------------------------------------------------------------------- clock
    def bag_now(self) -> int | None:
        """Current bag time for /clock: held during lock-step waits, else advancing at ``rate``."""
        with self._lock:
            if self._clock_hold is not None:
                t = self._clock_hold
            elif self._clock is None:
                return None
            else:
                wall, bag = self._clock
                t = bag + int((time.perf_counter() - wall) * self.config.rate * 1e9)
            # monotonic by construction: a lock-step hold at the previous frame's time, or a re-anchored clock,
            # can lie behind what was already published; a simulated clock never runs backwards
            if self._clock_last is not None and t < self._clock_last:
                t = self._clock_last
            self._clock_last = t
            return t

    # ------------------------------------------------------------------------------------------- results
    def on_labels(self, msg: Image) -> None:
        try:
            self._on_labels(msg)
        except Exception:  # a scoring bug must not take the executor down with it
            log.exception("live replay: failed to process a result on %s", self.config.labels_topic)

    def _on_labels(self, msg: Image) -> None:
        received = time.perf_counter()
        stamp = stamp_ns(msg.header)
        try:
            labels = image_to_array(msg)
        except ImageConversionError as exc:
            log.warning("result on %s with stamp %d is not a valid mono8 image: %s", self.config.labels_topic,
                        stamp, exc)
            labels = None
        with self._lock:
            pending = self._pending.pop(stamp, None)
            if pending is None or self.report is None:
                self.unexpected_results += 1
                return
            record = pending.record
            record.latency_ms = (received - pending.published) * 1000.0
            if labels is None or labels.ndim != 2:
                record.status = "skipped"
                self.report.add_frame(record)
            else:
                self.report.add_frame(record, labels, self._gt.pop(stamp, None))
                self._answered[stamp] = record
            self._last_result = received
            # the node answers in publish order: anything published before this frame and still open was dropped
            for old in [p for p in self._pending.values() if p.seq < pending.seq]:
                self._drop(old)
            self._lock.notify_all()
            if self._writer is not None and labels is not None and record.loop == 0:
                # bag time of arrival; written by the player thread (sqlite handles are thread-bound)
                t_ns = record.t_ns + int(record.latency_ms * 1e6 * self.config.rate)
                self._to_write.append((t_ns, stamp, msg.header.frame_id, np.array(labels)))

    def on_coverage(self, msg: DiagnosticArray) -> None:
        if self.report is None or not msg.status:
            return
        stamp = stamp_ns(msg.header)
        index = {n: i for i, n in enumerate(self.report.class_names)}
        values = {kv.key: kv.value for kv in msg.status[0].values}
        if set(values) != set(index):  # coverage_classes restricts the list: compute it from the labels instead
            return
        cov = np.zeros(len(index), np.float32)
        for key, value in values.items():
            cov[index[key]] = float(value)
        with self._lock:
            self._node_coverage[stamp] = cov

    def _flush_writes(self) -> None:
        """Write the node's labels received so far into the output bag (player thread only)."""
        with self._lock:
            items, self._to_write = self._to_write, []
        for t_ns, stamp, frame_id, labels in items:
            self._writer.write_labels(t_ns, stamp, frame_id, labels)

    def _drop(self, pending: _Pending) -> None:
        """Close a frame the node never answered (call with the lock held)."""
        self._pending.pop(pending.key, None)
        self._gt.pop(pending.key, None)
        pending.record.status = "dropped"
        assert self.report is not None
        self.report.add_frame(pending.record)

    # ------------------------------------------------------------------------------------------- bag side
    def _frames(self, shift: int = 0) -> Iterator[BagMessage]:
        """Image messages in order; ground-truth labels up to READ_AHEAD_NS ahead are decoded into ``_gt``
        (keyed by stamp + ``shift``, the stamp the frame is published with)."""
        topics = [self.image.name] + ([self.label.name] if self.label else [])
        copy_all = self._writer is not None and self._write_pass
        source = self.reader.messages(None if copy_all else topics, start_ns=self.start_ns, deserialize=topics)
        queue: deque[BagMessage] = deque()
        last_t = -1
        exhausted = False
        while True:
            while not exhausted and (not queue or last_t <= queue[0].t_ns + READ_AHEAD_NS):
                msg = next(source, None)
                if msg is None:
                    exhausted = True
                    break
                last_t = msg.t_ns
                if copy_all:
                    self._writer.write_raw(msg.topic, msg.t_ns, msg.raw)
                    self._flush_writes()
                if msg.msg is None:
                    continue
                if self.label is not None and msg.topic == self.label.name:
                    try:
                        gt = decode_label_message(msg.msg, self.label.msgtype)
                    except Exception as exc:  # one bad label: skip and count it, keep playing
                        self.reader.skip(msg, "undecodable label", exc)
                        continue
                    with self._lock:
                        self._gt[msg.stamp_ns + shift] = gt
                elif msg.topic == self.image.name:
                    queue.append(msg)
            if not queue:
                return
            yield queue.popleft()

    # ------------------------------------------------------------------------------------------- setup
    def _spawn(self, context: Any) -> Any:
        from ecmnet_ros.segmenter import SegmenterNode

        params = [Parameter(k, value=v) for k, v in self.config.node_parameters.items() if v is not None]
        compressed = self.image.msgtype == COMPRESSED_IMAGE
        params.append(Parameter("compressed", value=compressed))
        source = "image/compressed" if compressed else "image"
        node = SegmenterNode(self.config.node_name, context=context, namespace=self.config.namespace or None,
                             parameter_overrides=params,
                             cli_args=["--ros-args", "-r", f"{source}:={self.publish_topic}"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the node logs the random-weights warning itself
            up = node.bring_up()
        if not up:
            error = getattr(node, "_last_error", "") or "configure/activate failed"
            node.destroy_node()
            raise RuntimeError(f"--spawn-node: the segmenter node did not come up: {error}")
        return node

    def _class_names(self, player: Node, spawned: Any) -> tuple[list[str], Any]:
        """Class names (and palette) of the node's model: from the spawned node, the node's ``class_names``
        parameter, the bag's make-bag metadata, or ``--num-classes``."""
        if spawned is not None and spawned.segmenter is not None:
            seg = spawned.segmenter
            names = list(seg.class_names)
            bag_names = self.reader.custom_data.get("class_names")
            if seg.random_weights and isinstance(bag_names, list) and len(bag_names) == len(names):
                return [str(n) for n in bag_names], self.reader.custom_data.get("palette")
            return names, seg.palette
        from rclpy.parameter_client import AsyncParameterClient

        client = AsyncParameterClient(player, f"{self.config.namespace}/{self.config.node_name}")
        if client.wait_for_services(timeout_sec=min(self.config.wait, 5.0)):
            future = client.get_parameters(["class_names"])
            deadline = time.monotonic() + 5.0
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            if future.done() and future.result() is not None and future.result().values:
                names = list(future.result().values[0].string_array_value)
                if names:
                    return names, self.reader.custom_data.get("palette")
        bag_names = self.reader.custom_data.get("class_names")
        if isinstance(bag_names, list) and bag_names:
            return [str(n) for n in bag_names], self.reader.custom_data.get("palette")
        if self.config.num_classes:
            return [f"class_{i}" for i in range(self.config.num_classes)], None
        raise BagError("cannot tell the node's classes: no class_names parameter answered, no class names in the "
                       "bag; pass --num-classes")

    def _wait_for_graph(self, player: _ReplayNode) -> None:
        deadline = time.monotonic() + self.config.wait
        while time.monotonic() < deadline:
            if player.image_pub.get_subscription_count() > 0 and player.label_sub.get_publisher_count() > 0:
                return
            time.sleep(0.05)
        image_subs = player.image_pub.get_subscription_count()
        topics = ", ".join(f"{n} [{'/'.join(t)}]" for n, t in player.get_topic_names_and_types()
                           if "Image" in " ".join(t)) or "none"
        problem = (f"nobody subscribes to {self.publish_topic}" if image_subs == 0 else
                   f"nobody publishes {self.config.labels_topic}")
        raise BagError(f"live replay: {problem} after {self.config.wait:g} s. Is the segmenter node running (or "
                       f"use --spawn-node)? Remap its input to the bag topic (image:={self.publish_topic}) or the "
                       f"bag topic to its input (--remap {self.image.name}:=/image), and check --namespace / "
                       f"--node-name / --result-topic. Image topics seen: {topics}")

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> ReplayReport:
        # An in-process node's inference thread holds the GIL between (short) torch calls; with the default 5 ms
        # switch interval the publisher then waits up to 5 ms per GIL hand-over and falls behind the bag's pace.
        switch = sys.getswitchinterval()
        if self.config.spawn_node:
            sys.setswitchinterval(min(switch, SPAWNED_SWITCH_INTERVAL_S))
        try:
            with ros_context() as context:
                spinner = Spinner(context).start()
                try:
                    return self._run(context, spinner)
                finally:
                    spinner.stop()  # executor, spin thread, nodes; the context goes last
        finally:
            sys.setswitchinterval(switch)
            self.reader.close()

    def _run(self, context: Any, spinner: Spinner) -> ReplayReport:
        cfg = self.config
        player = spinner.add(_ReplayNode(self, context))
        spawned = spinner.add(self._spawn(context)) if cfg.spawn_node else None
        if player.clock_pub is not None:
            with self._lock:
                self._clock_hold = self.start_ns or self.reader.start_ns  # use_sim_time nodes need a time first
        self._wait_for_graph(player)
        names, palette = self._class_names(player, spawned)
        self.report = self._new_report(names, palette, spawned)
        if cfg.output_bag:
            self._writer = LabelBagWriter(Path(cfg.output_bag), self.reader, cfg.output_label_topic)
        self._progress = Progress("replay --live", "frame", cfg.max_frames)
        try:
            try:
                self._play(player)
            except KeyboardInterrupt:
                log.warning("interrupted: playback stopped, collecting the results of the frames sent so far")
            self._progress.close()
            self._drain()
        except BaseException:
            if self._writer is not None:
                self._writer.abort()
                self._writer = None
            raise
        with self._lock:
            for pending in list(self._pending.values()):
                self._drop(pending)
            for key, record in self._answered.items():  # prefer what the node reported
                if key in self._node_coverage:
                    record.coverage = self._node_coverage[key]
        if self._writer is not None:
            self._flush_writes()
            self.report.bag["output_bag"] = str(self._writer.close())
        self._finish()
        return self.report

    def _new_report(self, names: list[str], palette: Any, spawned: Any) -> ReplayReport:
        cfg = self.config
        seg: dict[str, Any] = {"node": f"{cfg.namespace}/{cfg.node_name}", "labels_topic": cfg.labels_topic,
                               "spawned": bool(spawned)}
        if spawned is not None and spawned.segmenter is not None:
            seg.update(spawned.segmenter.describe(), random_weights=bool(spawned.segmenter.random_weights))
        bag = {"path": str(self.reader.path), "storage": self.reader.storage, "image_topic": self.image.name,
               "image_type": self.image.msgtype, "published_as": self.publish_topic,
               "label_topic": self.label.name if self.label else None, "messages": self.reader.message_count,
               "duration_s": self.reader.duration_ns / 1e9, "start_offset_s": cfg.start_offset,
               "dataset": self.reader.custom_data.get("dataset")}
        return ReplayReport("lockstep" if cfg.lockstep else "live", names, bag=bag, segmenter=seg,
                            palette=None if palette is None else np.asarray(palette))

    def _sleep_until(self, due: float) -> None:
        while (left := due - time.perf_counter()) > 0:
            time.sleep(min(left, SLEEP_SLICE_S))

    def _play(self, player: _ReplayNode) -> None:
        cfg = self.config
        names, first_index = frame_names(self.reader, self.image.name, self.start_ns)
        started = time.perf_counter()
        stop_at = started + cfg.duration if cfg.duration else None
        published = 0
        pass_no = 0
        prev: _Pending | None = None
        shift = 0  # added to stamps and bag time in later --loop passes (they continue after the bag's end)
        first_t: int | None = None
        last_t = 0
        while True:
            anchor: tuple[float, int] | None = None
            index = first_index
            for msg in self._frames(shift):
                now = time.perf_counter()
                if (cfg.max_frames is not None and published >= cfg.max_frames) or (stop_at and now >= stop_at):
                    return
                if anchor is None:
                    anchor = (now, msg.t_ns)
                if cfg.lockstep and prev is not None:
                    with self._lock:
                        self._clock_hold = prev.record.t_ns + (prev.key - prev.record.stamp_ns)
                        answered = self._lock.wait_for(lambda p=prev: self._pending.get(p.key) is not p, cfg.timeout)
                    if not answered:
                        self.lockstep_timeouts += 1
                        log.warning("lock-step: no result for frame %d (stamp %d) within %.1f s", prev.record.index,
                                    prev.record.stamp_ns, cfg.timeout)
                    # playback time stood still while we waited: continue from here at the recorded pace
                    now = time.perf_counter()
                    if now > anchor[0] + (msg.t_ns - anchor[1]) / 1e9 / cfg.rate:
                        anchor = (now, msg.t_ns)
                due = anchor[0] + (msg.t_ns - anchor[1]) / 1e9 / cfg.rate
                self._sleep_until(due)
                name = names[index] if index < len(names) else ""
                record = FrameRecord(index, msg.stamp_ns, msg.t_ns, name, loop=pass_no)
                index += 1
                try:
                    check_message(msg.msg)
                except ImageConversionError as exc:
                    self.reader.skip(msg, f"invalid image ({exc.kind})", exc)
                    record.status = "skipped"
                    with self._lock:
                        self.report.add_frame(record)
                    continue
                key, raw = msg.stamp_ns + shift, msg.raw
                if shift:  # later loop passes: unique stamps, so late results of a pass cannot match the next one
                    raw = restamp(raw, key)
                publish_time = time.perf_counter()
                with self._lock:
                    old = self._pending.get(key)
                    if old is not None:  # a repeated stamp in the bag: the earlier frame was never answered
                        self._drop(old)
                    self._seq += 1
                    prev = _Pending(record, publish_time, self._seq, key)
                    record.publish_s = publish_time - started
                    self._pending[key] = prev
                    self._clock, self._clock_hold = (anchor[0], anchor[1] + shift), None
                    if self._first_publish is None:
                        self._first_publish = publish_time
                player.image_pub.publish(raw)
                published += 1
                self._progress.update()
                first_t = msg.t_ns if first_t is None else first_t
                last_t = msg.t_ns
            pass_no += 1
            self._write_pass = False
            if not cfg.loop or published == 0 or first_t is None:
                return
            if pass_no == 1:
                count = max(1, published - 1)
                loop_span = (last_t - first_t) + max(1, (last_t - first_t) // count)
            shift = pass_no * loop_span

    def _drain(self) -> None:
        """Wait for outstanding results (at most ``drain`` seconds after the last publish)."""
        with self._lock:
            self._lock.wait_for(lambda: not self._pending, self.config.drain)

    def _finish(self) -> None:
        report = self.report
        assert report is not None
        report.count_skipped(self.reader.skipped)
        frames = [f for f in report.frames if f.status != "skipped"]
        answered = [f for f in frames if f.status == "ok"]
        wall = (self._last_result - self._first_publish) if self._last_result and self._first_publish else 0.0
        pubs = [f.publish_s for f in frames if f.publish_s is not None]
        span = max(pubs) - min(pubs) if len(pubs) > 1 else 0.0
        report.extra.update(
            published=len(frames), received=len(answered), dropped=len(frames) - len(answered),
            drop_rate=(len(frames) - len(answered)) / len(frames) if frames else 0.0,
            throughput_fps=len(answered) / wall if wall > 0 else 0.0,
            publish_fps=(len(pubs) - 1) / span if span > 0 else 0.0,
            lockstep=self.config.lockstep, lockstep_timeouts=self.lockstep_timeouts,
            unexpected_results=self.unexpected_results, rate=self.config.rate, qos=self.config.qos,
            loop=self.config.loop, wall_s=wall, clock_hz=self.config.clock_hz)


# ------------------------------------------------------------------------------------------------ CLI glue
def config_from_args(args: argparse.Namespace) -> LiveReplayConfig:
    from ecmnet_core.inference.options import inference_config_from_args
    from ecmnet_ros.params import node_parameters

    # the spawned node gets the model settings offline replay uses: the same options, read the same way
    params = node_parameters(inference_config_from_args(args), model=args.model)
    if args.num_classes:
        params["num_classes"] = args.num_classes
    return LiveReplayConfig(
        bag=args.live, image_topic=args.image_topic, label_topic=args.label_topic, rate=args.rate, loop=args.loop,
        duration=args.duration, start_offset=args.start_offset, max_frames=args.max_frames,
        remap=parse_remaps(args.remap), clock_hz=args.clock, qos=args.qos, lockstep=args.lockstep,
        timeout=args.timeout, namespace=args.namespace, node_name=args.node_name, result_topic=args.result_topic,
        spawn_node=args.spawn_node, node_parameters=params, wait=args.wait, drain=args.drain,
        num_classes=args.num_classes, output_bag=args.output_bag, output_label_topic=args.output_label_topic)


def _bag_classes(bag: str) -> int | None:
    with BagReader(bag) as reader:
        names = reader.custom_data.get("class_names")
    return len(names) if isinstance(names, list) else None


def run_live_from_args(args: argparse.Namespace) -> int:
    """``replay --live``: run, print the summary, write the report files."""
    try:
        if args.spawn_node and args.model and not args.num_classes:
            args.num_classes = _bag_classes(args.live)
        replay = LiveReplay(config_from_args(args))
        try:
            report = replay.run()
        except KeyboardInterrupt:
            raise SystemExit("replay: interrupted") from None
    except (BagError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"replay: {exc}") from None
    report.publish(args.out, not args.no_plots, args.output_label_topic if args.output_bag else None, "node")
    return 0

